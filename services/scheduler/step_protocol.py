"""A rank's part in its world's step, as the service's event loop awaits it.

Every step, in this order, on every rank of the world:
    share_inputs    the group leader's new requests, aborts and flush flag reach its followers
    gather_counts   (DP attention) every group's token count, the same list on every rank;
                    all zero: nobody runs
    forward         this group's batch, or an idle one (0 tokens) while another group has work,
                    so every feed-forward collective lines up; then the leader's sampled tokens
                    replace the followers' own
All of it runs on the one forward thread (dist_sync.py: the collectives; dp_attention.py: the
layout and the layers). A collective that fails, or a forward that raises in a distributed world
(its peers may be inside a collective this rank skipped), is WorldBroken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from services.scheduler.dist_sync import GroupSync, StepInputs, WorldBroken, keepalive_s
from services.scheduler.dp_attention import DPAttentionLinears, ParallelLayout
from services.scheduler.engine import Engine
from services.scheduler.model.parallel import Linears
from services.scheduler.runner import StepPlan, StepResult

# DP attention, every group idle: a leader re-enters the all-gather after this long without
# work of its own, so a group that does get work finds the others in the collective.
IDLE_POLL_S = 0.02
T = TypeVar("T")


class StepProtocol:
    def __init__(
        self,
        layout: ParallelLayout,
        engine: Engine,
        sync: GroupSync,
        linears: Linears | None,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.layout = layout
        self.engine = engine
        self.sync = sync
        self.linears = linears
        self.executor = executor  # the forward thread

    async def _on_forward_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def share_inputs(self, inputs: StepInputs | None) -> StepInputs:
        """Leader: passes its inputs and gets them back; followers pass None and get the leader's."""
        if inputs is not None and self.layout.attn_tp_size == 1:
            return inputs  # no followers
        return await self._on_forward_thread(self.sync.share_inputs, inputs)

    async def gather_counts(self, plan: StepPlan | None) -> list[int]:
        """Tokens of each DP group this step ([this group's] without DP attention)."""
        num_tokens = plan.batch.num_tokens if plan is not None else 0
        if self.layout.dp_groups == 1:
            return [num_tokens]
        return await self._on_forward_thread(self.sync.gather_counts, num_tokens)

    async def forward(self, plan: StepPlan | None, counts: list[int]) -> StepResult | None:
        """This group's batch (None: an idle batch, and no result)."""
        try:
            return await self._on_forward_thread(self._forward, plan, counts)
        except WorldBroken:
            raise
        except Exception as e:
            if self.layout.distributed:
                raise WorldBroken(f"forward step failed: {e!r}") from e
            raise

    def _forward(self, plan: StepPlan | None, counts: list[int]) -> StepResult | None:
        """Forward thread: the model on this group's batch, then the group's sampled tokens made
        equal to the leader's."""
        if isinstance(self.linears, DPAttentionLinears):
            self.linears.step_tokens = counts
        if plan is None:
            self.engine.forward_idle()
            return None
        result = self.engine.forward(plan)
        result.sampled.tokens = self.sync.share_tokens(result.sampled.tokens)
        return result

    def idle_wait_s(self, dist_timeout: float) -> float | None:
        """How long an idle leader may wait for input before its next step (None: indefinitely)."""
        if self.layout.dp_groups > 1:
            return IDLE_POLL_S
        if self.layout.attn_tp_size > 1:  # followers wait in share_inputs: keep them inside the timeout
            return keepalive_s(dist_timeout)
        return None
