"""PrefillManager: the waiting queue, its order (`--schedule-policy`), and the prefill part of a step.

Each step it picks requests in policy order while the step's prefill token budget, the
running-request limit and the KV room allow. The budget is `--max-prefill-tokens`, and with
chunked prefill on also `--chunked-prefill-size`, as in SGLang (its PrefillAdder spends one chunk
budget over the whole step, not one per request). A prompt longer than what is left of the budget
(or of the room) is fed over several steps: it stays the `chunked` request, first in line next
step, and no request behind it starts in the meantime.
KV room for a new request keeps a reserve for the decode steps of the running ones
(SGLang's new_token_ratio estimate), so retraction stays rare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.scheduler.cache import CacheManager
from services.scheduler.request import Req

SCHEDULE_POLICIES = ("fcfs", "lpm")
LPM_MAX_QUEUE = 128  # longer queues fall back to fcfs: matching every prompt costs too much


@dataclass
class PrefillConfig:
    chunked_prefill_size: int  # <= 0: off
    max_prefill_tokens: int
    max_running_requests: int
    policy: str = "fcfs"


def match_limit(req: Req) -> int:
    """How much of all_ids may come from the cache: never the last token (its logits are
    needed), and not past the first input position whose logprob is still owed."""
    limit = req.seq_len - 1
    owed = len(req.input_ids) - req.input_logprob_start - len(req.input_logprobs)
    if req.return_logprob and owed > 0:
        limit = min(limit, max(len(req.input_ids) - owed - 1, 0))
    return limit


class PrefillManager:
    def __init__(self, cfg: PrefillConfig, cache: CacheManager) -> None:
        if cfg.policy not in SCHEDULE_POLICIES:
            raise ValueError(f"unknown schedule policy {cfg.policy!r}; choose from {SCHEDULE_POLICIES}")
        self.cfg = cfg
        self.cache = cache
        self.waiting: list[Req] = []  # by arrival (retracted requests go back in arrival order)
        self.chunked: Req | None = None  # admitted, prompt partly fed

    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def put_back(self, req: Req) -> None:
        """A retracted request: back into the queue at its arrival position."""
        i = next((i for i, r in enumerate(self.waiting) if r.arrived > req.arrived), len(self.waiting))
        self.waiting.insert(i, req)

    def remove(self, rid: str) -> Req | None:
        if self.chunked is not None and self.chunked.rid == rid:
            req, self.chunked = self.chunked, None
            return req
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                return req
        return None

    def _ordered(self) -> list[Req]:
        tree = self.cache.tree
        if self.cfg.policy == "lpm" and tree is not None and len(self.waiting) <= LPM_MAX_QUEUE:
            key: Callable[[Req], int] = lambda r: -tree.match_len(r.all_ids[: match_limit(r)])  # noqa: E731
            return sorted(self.waiting, key=key)  # stable: ties keep arrival order
        return list(self.waiting)

    def schedule(self, num_running: int, reserve: int, new_token_ratio: float) -> list[Req]:
        """Requests to feed this step, with `extend_now` set and their slots allocated.
        `reserve`: KV room to leave for the running requests' coming decode steps; each request
        picked adds new_token_ratio x its remaining max_new_tokens to it."""
        picked: list[Req] = []
        chunk = self.cfg.chunked_prefill_size if self.cfg.chunked_prefill_size > 0 else None
        budget = min(self.cfg.max_prefill_tokens, chunk or self.cfg.max_prefill_tokens)
        candidates = ([self.chunked] if self.chunked is not None else []) + (
            [] if self.chunked is not None else self._ordered()
        )
        self.chunked = None
        for req in candidates:
            first = not picked and num_running == 0
            if req.row < 0:
                if num_running + len(picked) >= self.cfg.max_running_requests:
                    break
                self.cache.admit(req, match_limit(req))
            remaining = req.extend_len
            n = remaining
            if n > budget:
                n = budget if chunk is not None else (n if first else 0)
            room = self.cache.available if first else self.cache.available - reserve
            if n > room:
                n = room if (chunk is not None or first) else 0
            if n <= 0:
                if req.cached_len == req.tree_len:
                    self.unadmit(req)  # nothing of its own yet: back to waiting
                else:
                    self.chunked = req  # keeps its fed part; tries again next step
                break
            slots = self.cache.alloc(n)
            assert slots is not None
            self.cache.assign(req, slots)
            req.extend_now = n
            if req in self.waiting:
                self.waiting.remove(req)
            picked.append(req)
            budget -= n
            reserve += int(new_token_ratio * (req.sampling.max_new_tokens - len(req.output_ids)))
            if n < remaining:
                self.chunked = req
                break
            if budget <= 0:
                break
        return picked

    def unadmit(self, req: Req) -> None:
        """Undo `admit` for a request that got no room (its cache match and own slots are dropped): back
        to waiting, by its arrival."""
        if req.row >= 0:
            self.cache.release(req, keep=False)
        req.cached_len = 0
        if req not in self.waiting:
            self.put_back(req)
