"""The model side of a step: a plan (the batch of the scheduled requests) in, sampled tokens
and prompt logprobs out.

`plan` runs on the service's event loop; `forward` and `forward_idle` on the forward thread,
where they read request state and never change it. Batch rows follow the plan's request order,
the same on every rank of a group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.scheduler.grammar import TokenMasks
from services.scheduler.logprobs import Pair, input_positions, token_logprob, top_logprobs
from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.request import Req
from services.scheduler.sampler import Sampled, sample
from services.scheduler.table import ReqToTokenTable


@dataclass
class StepPlan:
    reqs: list[Req]  # batch order: running requests, then prefill chunks
    batch: ForwardBatch
    # per row: hidden-state indices whose logits give prompt-token logprobs, and those tokens
    input_lp: list[tuple[list[int], list[int]]] = field(default_factory=list)


@dataclass
class StepResult:
    sampled: Sampled  # rows of the requests that emit, in plan order
    input_lp: list[list[Pair]]  # per plan row
    input_top: list[list[list[Pair]]]


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, pool: KVPool, table: ReqToTokenTable, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.model = model
        self.pool = pool
        self.table = table
        self.eos_token_ids = eos_token_ids
        self.masks = TokenMasks()

    def plan(self, reqs: list[Req]) -> StepPlan:
        """The batch that feeds each request its extend_now tokens, in the order given."""
        input_ids: list[int] = []
        positions: list[int] = []
        locs: list[torch.Tensor] = []
        input_lp: list[tuple[list[int], list[int]]] = []
        offset = 0
        for req in reqs:
            a, b = req.cached_len, req.cached_len + req.extend_now
            input_ids += req.all_ids[a:b]
            positions += range(a, b)
            locs.append(self.table.slots[req.row, a:b])
            idx: list[int] = []
            toks: list[int] = []
            if req.return_logprob:
                have = len(req.input_logprobs) or (1 if req.input_logprob_start == 0 else 0)
                for i in input_positions(req.input_logprob_start, a, b, len(req.input_ids), have):
                    idx.append(offset + (i - 1 - a))
                    toks.append(req.input_ids[i])
            input_lp.append((idx, toks))
            offset += b - a
        batch = ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_cache_loc=torch.cat(locs),
            extend_lens=[r.extend_now for r in reqs],
            seq_lens=[r.cached_len + r.extend_now for r in reqs],
            kv_indices=[self.table.slots[r.row, : r.cached_len + r.extend_now] for r in reqs],
            kv_pool=self.pool,
        )
        return StepPlan(reqs, batch, input_lp)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> StepResult:
        """The model, then the sampler (the forward thread; reads request state only)."""
        ends = plan.batch.last_token_index().tolist()
        emit = [i for i, r in enumerate(plan.reqs) if r.emits_now]
        extra = [j for idx, _ in plan.input_lp for j in idx]
        logits = self._logits(plan.batch, [ends[i] for i in emit] + extra)
        emit_reqs = [plan.reqs[i] for i in emit]
        sampled = sample(logits[: len(emit)], emit_reqs, [self.banned_ids(r) for r in emit_reqs], self.masks)
        result = StepResult(sampled, [], [])
        lp = torch.log_softmax(logits[len(emit) :], dim=-1) if extra else logits[:0]
        k = 0
        for req, (idx, toks) in zip(plan.reqs, plan.input_lp, strict=True):
            rows = lp[k : k + len(idx)]
            k += len(idx)
            result.input_lp.append([token_logprob(row, t) for row, t in zip(rows, toks, strict=True)])
            result.input_top.append([top_logprobs(row, req.top_logprobs_num) for row in rows])
        return result

    @torch.inference_mode()
    def forward_idle(self) -> None:
        """DP attention: this group has no tokens but another has; run the model body on an empty
        batch so this rank joins every feed-forward collective (no KV is read or written)."""
        empty = torch.empty(0, dtype=torch.int64)
        batch = ForwardBatch(empty, empty, empty, [], [], [], self.pool).to(self.model.lm_head.weight.device)
        self.model.model(batch, self.model.attn_backend)

    def _logits(self, batch: ForwardBatch, rows: list[int]) -> torch.Tensor:
        """Float32 logits at the given token indices of the batch (Llama-family layout)."""
        model = self.model
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(model, "lm_head"):
            assert rows == batch.last_token_index().tolist()[: len(rows)], "model gives last-token logits only"
            return model(batch)
        batch = batch.to(model.lm_head.weight.device)
        hidden = inner(batch, model.attn_backend)
        picked = hidden[torch.tensor(rows, dtype=torch.long, device=hidden.device)]
        return model.lm_head(inner.norm(picked)).float()

    def banned_ids(self, req: Req) -> list[int]:
        """Tokens `req` may not sample yet: its stop tokens (and EOS) before min_new_tokens."""
        p = req.sampling
        if len(req.output_ids) >= p.min_new_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
