"""The serving engine of one DP rank: one step = schedule -> forward -> update.

A thin loop over small managers: `CacheManager` (KV slots, req-to-token table, radix prefix
cache), `PrefillManager` (waiting queue, policy, chunked prefill, token budget),
`DecodeManager` (running batch, retraction) and `ModelRunner` (the batch, the model, the
sampler). `schedule` and `update` run on the service's event loop and own all request state;
`forward` runs the model and the sampler in a worker thread and only reads it. Each step feeds one token for every running request plus prompt chunks of
waiting ones, in one mixed forward; a request emits a token when its feed reaches seq_len.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch
from tokenizers import Tokenizer

from services.scheduler.cache import CacheManager
from services.scheduler.decode import DecodeManager
from services.scheduler.grammar import GrammarError, Grammars, replay
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.prefill import PrefillConfig, PrefillManager
from services.scheduler.request import Req
from services.scheduler.runner import ModelRunner, StepPlan, StepResult
from services.scheduler.table import ReqToTokenTable
from shared.messages import DETOK_CONTEXT, FinishReason, TokenOutput

log = logging.getLogger("scheduler.engine")

FULL_POOL_CHECK_MAX = 1 << 20  # slots: larger pools skip the allocator's O(size) scan at idle


@dataclass(frozen=True)
class EngineConfig:
    max_total_tokens: int
    max_running_requests: int
    prefill_budget: int  # prompt tokens one step may feed (--max-prefill-tokens)
    context_length: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int
    chunked_prefill_size: int = 8192  # <= 0: off
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False

    @classmethod
    def from_model(
        cls,
        model: ModelConfig,
        max_total_tokens: int,
        *,
        max_running_requests: int,
        prefill_budget: int,
        context_length: int = 0,
        chunked_prefill_size: int = 8192,
        schedule_policy: str = "fcfs",
        disable_radix_cache: bool = False,
    ) -> EngineConfig:
        """The serving limits over the model's own (its EOS ids and vocabulary; its
        max_position_embeddings unless `context_length` > 0)."""
        return cls(
            max_total_tokens=max_total_tokens,
            max_running_requests=max_running_requests,
            prefill_budget=prefill_budget,
            context_length=context_length or model.max_position_embeddings,
            eos_token_ids=tuple(model.eos_token_ids),
            vocab_size=model.vocab_size,
            chunked_prefill_size=chunked_prefill_size,
            schedule_policy=schedule_policy,
            disable_radix_cache=disable_radix_cache,
        )


@dataclass
class StepOutcome:
    """What one step did, for the loop that drives the engine."""

    outputs: list[TokenOutput]  # requests that ended outside the step first, then the step's
    reqs: list[Req]  # the batch that ran, in row order ([]: none ran)
    num_tokens: int  # tokens it fed

    @property
    def decode_only(self) -> bool:
        """Every row fed one token (a decode step)."""
        return 0 < len(self.reqs) == self.num_tokens


class Engine:
    def __init__(
        self,
        model: torch.nn.Module | None,
        pool: KVPool,
        tokenizer: Tokenizer,
        cfg: EngineConfig,
        make_runner: Callable[[KVPool, ReqToTokenTable], ModelRunner] | None = None,
    ) -> None:
        """`make_runner`: builds the runner over the pool and the table instead of a ModelRunner
        over `model` (`--device sim`: services/scheduler/sim/runner.py)."""
        self.pool = pool
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.table = ReqToTokenTable(cfg.max_running_requests + 1, cfg.context_length)
        self.cache = CacheManager(pool, self.table, use_radix=not cfg.disable_radix_cache)
        self.prefill = PrefillManager(
            PrefillConfig(
                chunked_prefill_size=cfg.chunked_prefill_size,
                max_prefill_tokens=cfg.prefill_budget,
                max_running_requests=cfg.max_running_requests,
                policy=cfg.schedule_policy,
            ),
            self.cache,
        )
        self.decode = DecodeManager(self.cache)
        if make_runner is not None:
            self.runner = make_runner(pool, self.table)
        else:
            assert model is not None, "an engine needs a model or make_runner"
            self.runner = ModelRunner(model, pool, self.table, cfg.eos_token_ids)
        self.grammars = Grammars(tokenizer, cfg.vocab_size, cfg.eos_token_ids)
        self.finished_early: list[Req] = []  # ended outside a step (abort, rejected); reported next update
        # prefill/decode disaggregation: a decode rank's requests whose prompt KV a prefill rank
        # computes (slots reserved, not yet installed); a prefill rank's requests whose rows
        # this update exported, for the service to ship
        self.transferring: dict[str, Req] = {}
        self.shipped: list[Req] = []

    # --- state the service reads ----------------------------------------------------------

    @property
    def running(self) -> list[Req]:
        return self.decode.running

    @property
    def waiting(self) -> list[Req]:
        """Requests not yet decoding: queued, mid-prefill, or waiting for a prefill rank's KV."""
        chunked = [self.prefill.chunked] if self.prefill.chunked else []
        return self.prefill.waiting + chunked + list(self.transferring.values())

    @property
    def has_work(self) -> bool:
        return bool(self.prefill.waiting or self.prefill.chunked or self.decode.running or self.transferring)

    @property
    def holding_tokens(self) -> int:
        return sum(r.seq_len for r in self.running) + sum(r.seq_len for r in self.waiting)

    @property
    def kv_used(self) -> int:
        """Slots held by requests (their own and their locked prefixes); evictable cache is free."""
        return self.cache.used_by_requests

    def _holders(self) -> list[Req]:
        chunked = [self.prefill.chunked] if self.prefill.chunked else []
        return self.decode.running + chunked + list(self.transferring.values())

    def assert_invariants(self) -> None:
        """free + cached + in use == total (any step boundary)."""
        self.cache.assert_invariants(self._holders())

    def assert_idle_invariants(self) -> None:
        """With nothing running, every slot is free or cached, and nothing is locked. The
        allocator's own scan is O(pool size) (1.75 s at 27.5M slots here), so it runs only on pools
        of up to FULL_POOL_CHECK_MAX slots: a rank with a large pool (a GPU's millions of tokens, a
        simulated one's hundreds of millions) would stall each time it goes idle, long enough to
        miss its heartbeats."""
        assert not self.has_work
        self.cache.assert_invariants([])
        if self.pool.size <= FULL_POOL_CHECK_MAX:
            self.pool.assert_invariants()
        assert self.cache.used_by_requests == 0, self.cache.used_by_requests

    def flush_cache(self) -> int:
        return self.cache.flush()

    # --- requests in and out --------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Tokens of KV one request may hold at most: the KV pool and the context both bound it."""
        return min(self.pool.size, self.cfg.context_length)

    def accept(self, req: Req) -> bool:
        """Whether `req` may run here; if not, it is ended (reported by the next update).

        max_new_tokens is clamped here, quietly, to the room this rank can ever give the request:
            max_new_tokens = min(max_new_tokens, context_length - prompt_len, pool_size - prompt_len)
        (min_new_tokens with it), so a request sent with "the rest of the context" runs on a pool
        smaller than the context and ends with finish_reason length where the pool ends (SGLang
        clamps to its max_req_len likewise). Hence max_len <= capacity: every request fits the pool
        alone, which retraction relies on. Only a prompt that leaves no room for a new token is an
        error (a prompt of exactly `capacity` tokens may still be scored, max_new_tokens 0).
        """
        problem = req.sampling.problem()
        room = self.capacity - len(req.input_ids)
        if not req.input_ids:
            problem = "empty prompt"
        elif not all(0 <= t < self.cfg.vocab_size for t in req.input_ids):
            problem = f"input_ids must be in [0, {self.cfg.vocab_size})"
        elif room < 0 or (room == 0 and req.sampling.max_new_tokens > 0):
            problem = (
                f"the prompt ({len(req.input_ids)} tokens) leaves no room for new tokens in this rank's "
                f"capacity of {self.capacity} tokens (KV pool {self.pool.size}, context {self.cfg.context_length})"
            )
        elif req.top_logprobs_num < 0 or req.logprob_start_len < -1:
            problem = "top_logprobs_num must be >= 0 and logprob_start_len >= -1"
        elif not all(0 <= t < self.cfg.vocab_size for t in req.output_ids):
            problem = f"resume_output_ids must be in [0, {self.cfg.vocab_size})"
        status = None  # HTTP status of a problem with the request's own constraint
        if problem is None and req.sampling.grammar is not None:
            problem = self._attach_grammar(req)
            status = 400 if problem is not None else None
        if problem is None and req.sampling.max_new_tokens > room:
            req.sampling = msgspec.structs.replace(
                req.sampling, max_new_tokens=room, min_new_tokens=min(req.sampling.min_new_tokens, room)
            )
        if problem is not None:
            req.finish = FinishReason(type="abort", message=problem, status=status)
            self.finished_early.append(req)
        elif len(req.output_ids) >= req.sampling.max_new_tokens and not req.scores_prompt:
            req.finish = FinishReason(type="length", length=len(req.output_ids))
            self.finished_early.append(req)
        else:
            return True
        return False

    def add(self, req: Req) -> None:
        """Admits `req` to the waiting queue, or ends it (`accept`)."""
        if self.accept(req):
            self.prefill.add(req)

    def _attach_grammar(self, req: Req) -> str | None:
        """Gives a constrained request its matcher (a migrated one's replays its output so far);
        returns what is wrong instead, if anything."""
        kind, source = req.sampling.grammar  # type: ignore[misc]
        try:
            req.grammar = self.grammars.matcher(kind, source)
        except GrammarError as e:
            return str(e)
        if not replay(req.grammar, req.output_ids):
            return f"resume_output_ids do not match the request's {kind}"
        return None

    # --- prefill/decode disaggregation ----------------------------------------------------------

    def add_remote(self, req: Req) -> int | None:
        """Decode rank: admits `req` for a prefill rank to prefill. It gets its table row, the prefix
        this rank has cached, and slots for the rest of its prompt, where the prefill rank's rows
        go (`install_remote`). Returns the first prompt position to receive; None when the request
        ended (`accept`) or will be prefilled here instead: no room now, or nothing to gain (a
        migrated request, prompt scoring)."""
        if not self.accept(req):
            return None
        n = len(req.input_ids)
        busy = len(self.decode.running) + len(self.transferring) + (1 if self.prefill.chunked else 0)
        if req.output_ids or req.scores_prompt or busy + len(self.prefill.waiting) >= self.cfg.max_running_requests:
            self.prefill.add(req)
            return None
        self.cache.admit(req, n - 1)
        skip = req.cached_len
        if n - skip > self.cache.available - self.decode.reserve():
            self.prefill.unadmit(req)
            return None
        slots = self.cache.alloc(n - skip)
        assert slots is not None
        self.cache.assign(req, slots)
        req.cached_len = n  # the slots are the request's; their rows arrive before it runs
        self.transferring[req.rid] = req
        return skip

    def install_remote(self, req: Req, rows: torch.Tensor, skip: int, first: TokenOutput,
                       rng_state: bytes = b"", prefill_cached: int = 0) -> list[TokenOutput]:
        """Decode rank: the prefill rank's rows of prompt positions [skip, len) go into the slots
        reserved for them, the prompt into the radix cache, and the first token it sampled (with
        its logprobs and the generator state after it) becomes the request's, as if this rank had
        prefilled it. Returns the request's output if it streams or ended."""
        del self.transferring[req.rid]
        req.prefill_where = "remote"
        self.pool.import_rows(self.table.slots[req.row, skip : len(req.input_ids)], rows)
        self.cache.cache_prefix(req)
        if rng_state and req.generator is not None:
            req.generator.set_state(torch.frombuffer(bytearray(rng_state), dtype=torch.uint8))
        req.cached_tokens = max(req.cached_tokens, prefill_cached)
        if req.return_logprob:
            req.input_logprobs = list(first.input_token_logprobs or [])
            req.input_top = list(first.input_top_logprobs or [])
        lp = first.output_token_logprobs[0] if first.output_token_logprobs else None
        top = first.output_top_logprobs[0] if first.output_top_logprobs else []
        assert first.all_ids, "a prefill rank's output carries its first token"
        outputs: list[TokenOutput] = []
        self._take_token(req, first.all_ids[0], lp, top, outputs)
        return outputs

    def prefill_locally(self, req: Req) -> None:
        """Decode rank: the rows will not come. The reserved slots are freed and the request waits
        to be prefilled here, like any other."""
        del self.transferring[req.rid]
        self.prefill.unadmit(req)

    def take_shipped(self) -> list[Req]:
        """Prefill rank: the requests whose rows the last update exported."""
        out, self.shipped = self.shipped, []
        return out

    def abort(self, rid: str) -> Req | None:
        """Removes `rid` wherever it is (waiting, mid-prefill, running, waiting for its KV); its own
        KV is freed."""
        req = self.transferring.pop(rid, None) or self.prefill.remove(rid)
        if req is None:
            req = next((r for r in self.decode.running if r.rid == rid), None)
            if req is None:
                return None
            self.decode.running.remove(req)
        if req.row >= 0:
            self.cache.release(req, keep=False)
        req.finish = FinishReason(type="abort", message="aborted")
        self.finished_early.append(req)
        return req

    # --- one step ---------------------------------------------------------------------------

    def step(self) -> StepOutcome:
        """schedule -> forward -> update, the forward on this thread. The service makes the same
        three calls with the forward on its forward thread (DP attention's collectives around it)."""
        plan = self.schedule()
        outputs = self.update(plan, self.forward(plan) if plan is not None else None)
        if plan is None:
            return StepOutcome(outputs, [], 0)
        return StepOutcome(outputs, plan.reqs, plan.batch.num_tokens)

    def schedule(self) -> StepPlan | None:
        chunked = [self.prefill.chunked] if self.prefill.chunked else []
        retracted = self.decode.retract_for_step(chunked)
        if self.prefill.chunked is not None and not chunked:
            self.prefill.chunked = None
        for req in retracted:
            self.prefill.put_back(req)
        if retracted:
            log.info(
                "retract n=%d running=%d kv_available=%d total_retracted=%d",
                len(retracted), len(self.decode.running), self.cache.available, self.decode.num_retracted,
            )
        reqs = self.decode.schedule()
        busy = len(reqs) + len(self.transferring)  # a transferring request holds a table row too
        reqs += self.prefill.schedule(busy, self.decode.reserve(), self.decode.new_token_ratio)
        if not reqs:
            return None
        return self.runner.plan(reqs)

    def forward(self, plan: StepPlan) -> StepResult:
        """The forward thread: the model and the sampler on the plan's batch."""
        return self.runner.forward(plan)

    def forward_idle(self) -> None:
        """DP attention: this group has no tokens but another has; run the model body on an empty
        batch so this rank joins every feed-forward collective (no KV is read or written)."""
        self.runner.forward_idle()

    def update(self, plan: StepPlan | None, result: StepResult | None) -> list[TokenOutput]:
        """The step's outputs: requests that ended outside it first, then what its forward sampled
        (plan None: no batch of this engine ran, only those)."""
        outputs = self.drain_finished_early()
        if plan is None:
            return outputs
        assert result is not None, "a scheduled batch needs its forward's result"
        tokens = iter(zip(result.sampled.tokens, result.sampled.logprobs, result.sampled.top, strict=True))
        for req, in_lp, in_top in zip(plan.reqs, result.input_lp, result.input_top, strict=True):
            emits = req.emits_now
            if req.return_logprob and not req.input_logprobs and req.input_logprob_start == 0:
                req.input_logprobs.append((None, req.input_ids[0]))
                req.input_top.append([])
            req.input_logprobs += in_lp
            req.input_top += in_top
            prefilled = req.extend_now > 1 or not req.output_ids
            req.cached_len += req.extend_now
            req.extend_now = 0
            if prefilled:
                self.cache.cache_prefix(req)  # later requests may share this prompt at once
            if not emits:
                continue  # mid-prompt chunk: stays PrefillManager.chunked
            token, lp, top = next(tokens)
            self._take_token(req, token, lp, top, outputs)
        return outputs

    def _take_token(
        self, req: Req, token: int, lp: tuple[float, int] | None, top: list[tuple[float, int]], outputs: list[TokenOutput]
    ) -> None:
        """The token `req` sampled: it joins the output (or ends the request), and the request runs
        on or releases its KV; its output goes to `outputs` if it streams or ended."""
        if req.scores_prompt:  # the prompt's logprobs were the point: nothing is generated
            req.finish = FinishReason(type="length", length=0)
        else:
            req.output_ids.append(token)
            if req.grammar is not None and not req.grammar.accept_token(token):
                log.error("rid=%s sampled token %d outside its grammar", req.rid, token)  # the mask forbids it
            if lp is not None:
                req.output_logprobs.append(lp)
                req.output_top.append(top)
            req.finish = self._check_finish(req, token)
        if req.ships_kv_from >= 0:  # a prefill rank's task ends at its first token
            req.kv_rows = self.pool.export_rows(self.table.slots[req.row, req.ships_kv_from : len(req.input_ids)])
            self.shipped.append(req)
            req.finish = req.finish or FinishReason(type="length", length=len(req.output_ids))
        if req.finished:
            if req in self.decode.running:
                self.decode.running.remove(req)
            self.cache.release(req, keep=True)
        elif req not in self.decode.running:
            self.decode.running.append(req)
        if req.stream or req.finished:
            outputs.append(req.take_output())

    def fail(self, plan: StepPlan, message: str) -> list[TokenOutput]:
        """Ends every request of a step whose forward failed; frees their KV (never cached)."""
        for req in plan.reqs:
            if req in self.decode.running:
                self.decode.running.remove(req)
            if self.prefill.chunked is req:
                self.prefill.chunked = None
            req.cached_len += req.extend_now  # the step's slots are the request's to free
            req.extend_now = 0
            self.cache.release(req, keep=False)
            req.finish = FinishReason(type="abort", message=message)
            self.finished_early.append(req)
        return self.drain_finished_early()

    def drain_finished_early(self) -> list[TokenOutput]:
        outputs = [r.take_output() for r in self.finished_early]
        self.finished_early.clear()
        return outputs

    # --- helpers ------------------------------------------------------------------------------

    def _check_finish(self, req: Req, token: int) -> FinishReason | None:
        p = req.sampling
        if req.grammar is not None and req.grammar.is_terminated():  # it accepted a stop token at its end
            return FinishReason(type="stop", matched=token)
        if not p.ignore_eos and token in self.cfg.eos_token_ids:
            return FinishReason(type="stop", matched=token)
        if token in p.stop_token_ids:
            return FinishReason(type="stop", matched=token)
        if p.stop and len(req.output_ids) >= p.min_new_tokens:
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
