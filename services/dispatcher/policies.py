"""Load-balance methods: one class each, picked by name from a registry.

A policy sees only live ranks (ordered by dp_rank) and their `RankState`: reported numbers plus
in-flight requests. Ties break by rank id. `routed_dp_rank` is handled by the dispatcher before any
policy runs.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from services.dispatcher.loads import RankState
from services.dispatcher.prefix_tree import PrefixTree
from shared.messages import TokenizedRequest

POLICIES: dict[str, type[Policy]] = {}


@dataclass(frozen=True)
class PolicyConfig:
    """The knobs of the policies that have any (SGLang router's names and defaults)."""

    cache_threshold: float = 0.5
    balance_abs_threshold: int = 32
    balance_rel_threshold: float = 1.0001
    max_tree_size: int = 1 << 22


def register(*names: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        for name in names:
            POLICIES[name] = cls
        return cls

    return wrap


def make_policy(name: str, seed: int | None = None, config: PolicyConfig | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"load-balance method {name!r} is not implemented; have {sorted(POLICIES)}")
    return POLICIES[name](seed, config or PolicyConfig())


class Policy(ABC):
    def __init__(self, seed: int | None = None, config: PolicyConfig | None = None) -> None:
        self.rng = random.Random(seed)
        self.config = config or PolicyConfig()

    @abstractmethod
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        """Chooses one of `live` (non-empty, ordered by dp_rank)."""

    def on_dispatched(self, req: TokenizedRequest, dp_rank: int) -> None:
        """Called for every request sent to a rank, routed ones included."""
        return None

    def cached_tokens(self, req: TokenizedRequest, dp_rank: int) -> int:
        """Prompt tokens the policy thinks `dp_rank` has cached (0: it does not track caches)."""
        return 0

    def on_rank_reset(self, dp_rank: int) -> None:
        """The rank restarted: whatever the policy remembered about it is gone."""
        return None


def _lightest(live: list[RankState], load: Callable[[RankState], int]) -> RankState:
    return min(live, key=lambda r: (load(r), r.dp_rank))  # ties break by rank id


def minimum_tokens_load(r: RankState) -> int:
    return r.holding_tokens + r.in_flight_tokens


@register("round_robin")
class RoundRobin(Policy):
    def __init__(self, seed: int | None = None, config: PolicyConfig | None = None) -> None:
        super().__init__(seed, config)
        self.last = -1

    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        after = [r for r in live if r.dp_rank > self.last]
        chosen = after[0] if after else live[0]
        self.last = chosen.dp_rank
        return chosen


@register("total_requests", "shortest_queue")
class TotalRequests(Policy):
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        return _lightest(live, lambda r: r.num_requests)


@register("total_tokens")
class TotalTokens(Policy):
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        return _lightest(live, lambda r: r.holding_tokens)


@register("minimum_tokens")
class MinimumTokens(Policy):
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        return _lightest(live, minimum_tokens_load)


@register("power_of_two")
class PowerOfTwo(Policy):
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        if len(live) == 1:
            return live[0]
        return _lightest(self.rng.sample(live, 2), minimum_tokens_load)


@register("random")
class Random(Policy):
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        return self.rng.choice(live)


@register("cache_aware")
class CacheAware(Policy):
    """Prefix affinity unless the load is imbalanced (the SGLang router's rule and flags).

    Imbalanced: max - min load > balance_abs_threshold and max > min * balance_rel_threshold, where
    a rank's load is its request count (running + waiting + in flight), the unit the SGLang router's
    thresholds are in; then the rank with the fewest tokens (held + in flight) gets the request.
    Otherwise the rank whose tree matches the longest prefix of the full prompt wins when the match
    covers more than `cache_threshold` of it; below that, the rank with the smallest tree.
    """

    def __init__(self, seed: int | None = None, config: PolicyConfig | None = None) -> None:
        super().__init__(seed, config)
        self.tree = PrefixTree(self.config.max_tree_size)

    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        requests = [r.num_requests for r in live]
        lo, hi = min(requests), max(requests)
        cfg = self.config
        if hi - lo > cfg.balance_abs_threshold and hi > lo * cfg.balance_rel_threshold:
            return _lightest(live, minimum_tokens_load)
        by_rank = {r.dp_rank: r for r in live}
        match = self.tree.match(req.input_ids, by_rank.keys())
        if req.input_ids and match.length / len(req.input_ids) > cfg.cache_threshold:
            # among equally good matches, the lighter one
            return _lightest([by_rank[k] for k in match.ranks], minimum_tokens_load)
        return min(live, key=lambda r: (self.tree.size.get(r.dp_rank, 0), minimum_tokens_load(r), r.dp_rank))

    def cached_tokens(self, req: TokenizedRequest, dp_rank: int) -> int:
        return self.tree.match(req.input_ids, [dp_rank]).length

    def on_dispatched(self, req: TokenizedRequest, dp_rank: int) -> None:
        self.tree.insert(req.input_ids, dp_rank)

    def on_rank_reset(self, dp_rank: int) -> None:
        self.tree.forget(dp_rank)
