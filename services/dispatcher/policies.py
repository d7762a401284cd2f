"""Load-balance methods: one class each, picked by name from a registry."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable

from services.dispatcher.loads import RankState
from shared.messages import TokenizedRequest

POLICIES: dict[str, type[Policy]] = {}


def register(*names: str) -> Callable[[type[Policy]], type[Policy]]:
    def wrap(cls: type[Policy]) -> type[Policy]:
        for name in names:
            POLICIES[name] = cls
        return cls

    return wrap


def make_policy(name: str, seed: int | None = None) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"load-balance method {name!r} is not implemented; have {sorted(POLICIES)}")
    return POLICIES[name](seed)


class Policy(ABC):
    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    @abstractmethod
    def pick(self, req: TokenizedRequest, live: list[RankState]) -> RankState:
        """Chooses one of `live` (non-empty, ordered by dp_rank)."""


def _lightest(live: list[RankState], load: Callable[[RankState], int]) -> RankState:
    return min(live, key=lambda r: (load(r), r.dp_rank))  # ties break by rank id


def minimum_tokens_load(r: RankState) -> int:
    return r.holding_tokens + r.in_flight_tokens


@register("round_robin")
class RoundRobin(Policy):
    def __init__(self, seed: int | None = None) -> None:
        super().__init__(seed)
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
