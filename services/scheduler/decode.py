"""DecodeManager: the running batch (requests past their prompt, one token per step) and retraction.

Slots are taken on demand, one per running request per step. When the pool (free + evictable
cache) cannot give every running request its slot, the newest requests by arrival are retracted:
their computed KV goes into the radix tree (freed when the cache is off), their counters reset,
and they wait to be prefilled again from all_ids. Greedy output is unchanged by it. The oldest
request is never retracted: every request fits the pool alone, so it always progresses.

new_token_ratio is SGLang's estimate of how much of its remaining max_new_tokens a running
request will still use; the prefill manager keeps that much room free. It decays every step
and jumps back up after a retraction.
"""

from __future__ import annotations

from services.scheduler.cache import CacheManager
from services.scheduler.request import Req

INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001


class DecodeManager:
    def __init__(self, cache: CacheManager) -> None:
        self.cache = cache
        self.running: list[Req] = []  # by the step they joined
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.num_retracted = 0  # total, for logs and tests

    def reserve(self) -> int:
        """KV room the running requests are expected to need from now on."""
        left = sum(r.sampling.max_new_tokens - len(r.output_ids) for r in self.running)
        return int(self.new_token_ratio * left)

    def retract_for_step(self, extra: list[Req]) -> list[Req]:
        """Retracts newest running requests until each remaining one can get its slot this step.
        `extra` (a partly prefilled request) is retracted first if that is not enough."""
        retracted: list[Req] = []
        while self.cache.available < len(self.running):
            pool = self.running + extra if len(self.running) > 1 else extra
            if not pool:
                break
            victim = max(pool, key=lambda r: r.arrived)
            if victim in extra:
                extra.remove(victim)
            else:
                self.running.remove(victim)
            self.cache.release(victim, keep=True)
            victim.cached_len = 0
            retracted.append(victim)
        if retracted:
            self.num_retracted += len(retracted)
            self.new_token_ratio = min(1.0, self.new_token_ratio + 0.3)
        else:
            self.new_token_ratio = max(MIN_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        return retracted

    def schedule(self) -> list[Req]:
        """The running requests with their one slot each; call after retract_for_step."""
        if not self.running:
            return []
        slots = self.cache.alloc(len(self.running))
        assert slots is not None, "retract_for_step left too few slots"
        for req, slot in zip(self.running, slots, strict=True):
            req.extend_now = 1
            self.cache.assign(req, slot.view(1))
        return list(self.running)
