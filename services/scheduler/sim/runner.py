"""SimRunner: the runner of a `--device sim` rank. The engine plans its batch as on a real device
(ModelRunner.plan: the same index tensors); the forward reads no model: it sleeps for the step
time `CostModel` gives for the batch and returns one token per emitting row.

Tokens: token i of a request's output is a hash of (its prompt, its sampling seed, i), drawn from
[first_token, vocab_end) where the tokenizer's special tokens (EOS among them) lie below
first_token: a request never ends on EOS, so its length is max_new_tokens (or a stop token / stop
string it asked for). Same request -> same tokens, whatever the batch, rank, retraction or
migration, so runs of different load-balance methods compare. Temperature and the other sampling
parameters change nothing, and no logprobs are computed (None where asked).

DP attention: every rank of the world runs the same step time. Each rank models its own group's
attention part, one all-gather (the real torch.distributed world) gives every rank every group's,
and the step costs the slowest group's attention plus the feed-forward over all groups' tokens:
the lockstep of the real model, whose feed-forward collectives wait for the slowest group.
"""

from __future__ import annotations

import logging
import time
import zlib

import torch
import torch.distributed as dist

from services.scheduler.dist_sync import collective
from services.scheduler.dp_attention import DPAttentionLinears
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.runner import ModelRunner, StepPlan, StepResult
from services.scheduler.sampler import Sampled
from services.scheduler.sim.cost import CostModel, Row, StepCost
from services.scheduler.table import ReqToTokenTable
from shared.bounded import BoundedDict

log = logging.getLogger("scheduler.sim")
MASK64 = (1 << 64) - 1
STATS_EVERY_S = 5.0  # a "sim stats" log line at most this often


def sim_token(key: int, index: int, first: int, end: int) -> int:
    """Token `index` of the output whose key is `key`: splitmix64 of both, in [first, end)."""
    z = (key * 0x9E3779B97F4A7C15 + index + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return first + (z ^ (z >> 31)) % (end - first)


class SimStats:
    """What the simulation cannot hide: the process CPU time per step (the scheduler's own work:
    bus, schedule, plan, update, collectives) next to the modeled device time. Only back-to-back
    steps count (the previous one ended less than BUSY_GAP_S before), so an idle rank's polling
    does not inflate it."""

    BUSY_GAP_S = 0.5

    def __init__(self) -> None:
        self.steps = 0
        self.modeled_s = 0.0
        self.busy_steps = 0
        self.busy_cpu_s = 0.0
        self.late_steps = 0  # the CPU work between two steps outlasted the modeled step
        self.last_cpu = time.process_time()
        self.last_step = self.last_log = time.monotonic()

    def step(self, cost: StepCost, late: bool) -> None:
        now, cpu = time.monotonic(), time.process_time()
        self.steps += 1
        self.late_steps += late
        self.modeled_s += cost.total_s
        if now - self.last_step < self.BUSY_GAP_S:
            self.busy_steps += 1
            self.busy_cpu_s += cpu - self.last_cpu
        self.last_step, self.last_cpu = now, cpu
        if now - self.last_log >= STATS_EVERY_S:
            self.last_log = now
            log.info(
                "sim stats steps=%d modeled_s=%.3f busy_steps=%d busy_cpu_s=%.3f cpu_per_step_ms=%.3f late_steps=%d",
                self.steps, self.modeled_s, self.busy_steps, self.busy_cpu_s,
                1000 * self.busy_cpu_s / max(1, self.busy_steps), self.late_steps,
            )


class SimRunner(ModelRunner):
    def __init__(
        self,
        cost: CostModel,
        pool: KVPool,
        table: ReqToTokenTable,
        eos_token_ids: tuple[int, ...],
        token_range: tuple[int, int],
        time_scale: float = 1.0,
        dpa: DPAttentionLinears | None = None,
    ) -> None:
        super().__init__(torch.nn.Identity(), pool, table, eos_token_ids)
        self.cost = cost
        self.first_token, self.end_token = token_range
        assert not any(self.first_token <= e < self.end_token for e in eos_token_ids), "EOS inside the token range"
        self.time_scale = time_scale
        self.dpa = dpa
        self.keys: BoundedDict[tuple[str, int], int] = BoundedDict(65536)
        self.stats = SimStats()
        self.last_cost: StepCost | None = None
        self.last_end = 0.0  # monotonic time the last step's modeled time ended

    def _key(self, rid: str, input_ids: list[int], seed: int | None) -> int:
        k = (rid, len(input_ids))
        key = self.keys.get(k)
        if key is None:
            digest = zlib.crc32(torch.tensor(input_ids, dtype=torch.int32).numpy().tobytes())
            key = self.keys[k] = (digest << 32) ^ ((seed or 0) & 0xFFFFFFFF)
        return key

    def forward(self, plan: StepPlan) -> StepResult:
        rows = [Row(e, s) for e, s in zip(plan.batch.extend_lens, plan.batch.seq_lens, strict=True)]
        self._run(rows, plan.batch.num_tokens)
        emit = [r for r in plan.reqs if r.emits_now]
        tokens = [
            sim_token(self._key(r.rid, r.input_ids, r.sampling.seed), len(r.output_ids), self.first_token, self.end_token)
            for r in emit
        ]
        return StepResult(
            Sampled(tokens, [None] * len(tokens), [[] for _ in tokens]),
            [[] for _ in plan.reqs],
            [[] for _ in plan.reqs],
        )

    def forward_idle(self) -> None:
        self._run([], 0)

    def _run(self, rows: list[Row], num_tokens: int) -> None:
        """Sleeps for this step's modeled time (the same on every rank of a DP-attention world)."""
        counts = self.dpa.step_tokens if self.dpa is not None else [num_tokens]
        cost = self.cost.step(rows, counts)
        if self.dpa is not None:
            mine = torch.tensor([cost.attention_s], dtype=torch.float64)
            parts = [torch.empty_like(mine) for _ in range(self.dpa.layout.tp_size)]
            collective("sim attention times", lambda: dist.all_gather(parts, mine))
            cost = StepCost(max(float(p) for p in parts), cost.ffn_s, cost.comm_s, cost.overhead_s)
        self.last_cost = cost
        budget = cost.total_s * self.time_scale
        now = time.monotonic()
        # back to back: this step began when the last one ended, so the scheduler's CPU work in
        # between (update, publish, schedule, plan, collectives) runs inside the modeled time, as
        # with SGLang's overlap scheduler; it shows only where it is longer (a late step)
        gap = now - self.last_end
        start = self.last_end if gap < budget else now
        late = budget <= gap < budget + SimStats.BUSY_GAP_S  # busy, but the CPU work outlasted the step
        time.sleep(max(0.0, start + budget - now))
        self.last_end = max(now, start + budget)
        self.stats.step(cost, late)
