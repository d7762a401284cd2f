"""The serving engine of one DP rank: one step = schedule -> forward -> update.

`schedule` and `update` run on the service's event loop and own all request state; `forward` runs
the model and the sampler in a worker thread and touches only tensors. Continuous batching: every
step feeds one token for each running request and, within the prefill budget, the prompts of
waiting requests, which then join the running batch; finished requests leave at once.

KV accounting: a request is admitted only when its reservation (prompt + max_new_tokens) fits next
to those of the running requests, so allocating its slots step by step never fails.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.request import Req
from services.scheduler.sampler import sample
from services.scheduler.table import ReqToTokenTable
from shared.messages import DETOK_CONTEXT, FinishReason, TokenOutput


@dataclass
class EngineConfig:
    max_total_tokens: int
    max_running_requests: int
    prefill_budget: int  # prompt tokens one step may feed
    context_length: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int


@dataclass
class StepPlan:
    reqs: list[Req]  # batch order: running requests by arrival, then newly admitted ones
    batch: ForwardBatch


class Engine:
    def __init__(self, model: torch.nn.Module, pool: KVPool, tokenizer: Tokenizer, cfg: EngineConfig) -> None:
        self.model = model
        self.pool = pool
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.table = ReqToTokenTable(cfg.max_running_requests, cfg.context_length)
        self.waiting: deque[Req] = deque()
        self.running: list[Req] = []
        self.reserved = 0  # sum of max_len over running requests
        self.finished_early: list[Req] = []  # ended outside a step (abort, rejected); reported next update

    # --- state the service reads ----------------------------------------------------------

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def holding_tokens(self) -> int:
        return sum(r.seq_len for r in self.running) + sum(r.seq_len for r in self.waiting)

    @property
    def kv_used(self) -> int:
        return self.pool.size - self.pool.num_free

    def check_idle_accounting(self) -> None:
        """With nothing running, every slot and every table row is free."""
        assert not self.running and self.reserved == 0, (len(self.running), self.reserved)
        assert self.pool.num_free == self.pool.size, (self.pool.num_free, self.pool.size)
        assert self.table.num_free == self.cfg.max_running_requests

    # --- requests in and out --------------------------------------------------------------

    def add(self, req: Req) -> None:
        problem = req.sampling.check()
        if not req.input_ids:
            problem = "empty prompt"
        elif not all(0 <= t < self.cfg.vocab_size for t in req.input_ids):
            problem = f"input_ids must be in [0, {self.cfg.vocab_size})"
        if problem is not None:
            req.finish = FinishReason(type="abort", message=problem)
            self.finished_early.append(req)
        elif req.max_len > min(self.pool.size, self.cfg.context_length):
            req.finish = FinishReason(
                type="abort",
                message=f"prompt ({len(req.input_ids)}) + max_new_tokens ({req.sampling.max_new_tokens}) "
                f"exceeds this rank's capacity of {min(self.pool.size, self.cfg.context_length)} tokens",
            )
            self.finished_early.append(req)
        elif req.sampling.max_new_tokens == 0:
            req.finish = FinishReason(type="length", length=0)
            self.finished_early.append(req)
        else:
            self.waiting.append(req)

    def abort(self, rid: str) -> Req | None:
        for req in self.waiting:
            if req.rid == rid:
                self.waiting.remove(req)
                break
        else:
            req = next((r for r in self.running if r.rid == rid), None)
            if req is None:
                return None
            self.running.remove(req)
            self._release(req)
        req.finish = FinishReason(type="abort", message="aborted")
        self.finished_early.append(req)
        return req

    # --- one step ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        admitted: list[Req] = []
        budget = self.cfg.prefill_budget
        while self.waiting and len(self.running) + len(admitted) < self.cfg.max_running_requests:
            req = self.waiting[0]
            fits_budget = len(req.input_ids) <= budget or (not admitted and budget == self.cfg.prefill_budget)
            if not fits_budget or self.reserved + req.max_len > self.pool.size:
                break
            self.waiting.popleft()
            req.row = self.table.alloc()
            self.reserved += req.max_len
            budget -= len(req.input_ids)
            admitted.append(req)
        self.running += admitted
        if not self.running:
            return None
        return StepPlan(self.running[:], self._build_batch(self.running))

    def _build_batch(self, reqs: list[Req]) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        extend_lens: list[int] = []
        new_slots = self.pool.alloc(sum(r.extend_len for r in reqs))
        assert new_slots is not None, "reservation admitted more than the pool holds"
        offset = 0
        for req in reqs:
            n = req.extend_len
            input_ids += req.all_ids[req.cached_len :]
            positions += range(req.cached_len, req.seq_len)
            self.table.slots[req.row, req.cached_len : req.seq_len] = new_slots[offset : offset + n]
            extend_lens.append(n)
            offset += n
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            out_cache_loc=new_slots,
            extend_lens=extend_lens,
            seq_lens=[r.seq_len for r in reqs],
            kv_indices=[self.table.slots[r.row, : r.seq_len] for r in reqs],
            kv_pool=self.pool,
        )

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> list[int]:
        """Runs in the worker thread: the model, then the sampler."""
        logits = self.model(plan.batch)
        banned = [self._banned_ids(r) for r in plan.reqs]
        return sample(logits, plan.reqs, banned)

    def update(self, plan: StepPlan, tokens: list[int]) -> list[TokenOutput]:
        outputs = [self._output(r) for r in self.finished_early]
        self.finished_early.clear()
        for req, token in zip(plan.reqs, tokens, strict=True):
            req.cached_len = req.seq_len
            req.output_ids.append(token)
            req.finish = self._check_finish(req, token)
            if req.finished:
                self.running.remove(req)
                self._release(req)
            if req.stream or req.finished:
                outputs.append(self._output(req))
        return outputs

    def fail(self, plan: StepPlan, message: str) -> list[TokenOutput]:
        """Ends every request of a step whose forward failed; frees their KV."""
        for req in plan.reqs:
            if req in self.running:
                self.running.remove(req)
                self._release_all(req)
            req.finish = FinishReason(type="abort", message=message)
            self.finished_early.append(req)
        return self.drain_finished_early()

    def drain_finished_early(self) -> list[TokenOutput]:
        outputs = [self._output(r) for r in self.finished_early]
        self.finished_early.clear()
        return outputs

    # --- helpers ------------------------------------------------------------------------------

    def _release_all(self, req: Req) -> None:
        """Like _release, for a step that allocated slots for the new tokens but never ran."""
        req.cached_len = req.seq_len
        self._release(req)

    def _release(self, req: Req) -> None:
        self.pool.free(self.table.slots[req.row, : req.cached_len].clone())
        self.table.free(req.row)
        self.reserved -= req.max_len
        req.row = -1

    def _banned_ids(self, req: Req) -> list[int]:
        p = req.sampling
        if len(req.output_ids) >= p.min_new_tokens:
            return []
        return list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.cfg.eos_token_ids))

    def _check_finish(self, req: Req, token: int) -> FinishReason | None:
        p = req.sampling
        if not p.ignore_eos and token in self.cfg.eos_token_ids:
            return FinishReason(type="stop", matched=token)
        if token in p.stop_token_ids:
            return FinishReason(type="stop", matched=token)
        if p.stop:
            longest = max(len(s) for s in p.stop)
            tail = self.tokenizer.decode(
                req.output_ids[-(longest + DETOK_CONTEXT) :], skip_special_tokens=p.skip_special_tokens
            )
            for s in p.stop:
                if s in tail:
                    return FinishReason(type="stop", matched=s)
        if len(req.output_ids) >= p.max_new_tokens or req.seq_len >= self.cfg.context_length:
            return FinishReason(type="length", length=len(req.output_ids))
        return None

    def _output(self, req: Req) -> TokenOutput:
        """The TokenOutput for what `req` generated since the last one (streamed or final)."""
        start = req.emitted if req.stream else 0
        context = req.output_ids[max(0, start - DETOK_CONTEXT) : start]
        new = req.output_ids[start:]
        req.emitted = len(req.output_ids)
        out = TokenOutput(
            rid=req.rid,
            gateway_id=req.gateway_id,
            seq=req.seq,
            ids=context + new,
            num_new=len(new),
            prompt_tokens=len(req.input_ids),
            completion_tokens=len(req.output_ids),
            skip_special_tokens=req.sampling.skip_special_tokens,
            stop=req.sampling.stop,
            finish=req.finish,
            all_ids=req.output_ids if req.finished else None,
        )
        req.seq += 1
        return out
