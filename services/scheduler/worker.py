"""The scheduler service of one rank: NATS in, engine steps, token batches and load reports out.

Requests and aborts that arrive while a step runs wait in the inbox and enter the engine at the
next step boundary. The leader reports its load after every step that changed it (at most every
`MIN_REPORT_GAP` s) and at least every heartbeat interval.

Under tensor parallelism (`--tp-size` > 1) the rank is one of a torch.distributed world
(dp_attention.py: the layout; dist_sync.py: the step protocol). Only a group leader
(attn_tp_rank 0) talks to NATS; its followers receive the step's inputs and sampled tokens from
it, so every rank of a group holds the same requests in the same order. With DP attention every
rank joins a per-step all-gather of the groups' token counts: nobody runs when all are idle, and
a group without work runs an idle batch while another group has some.

A broken world (a collective failed or timed out after --dist-timeout: a peer died or hangs; or
a forward step raised, which leaves this rank out of step with its peers) ends the process with
status EXIT_WORLD_BROKEN and no error to its requests: the launcher restarts the whole world, and
the dispatcher, seeing the group's heartbeats stop, migrates its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tokenizers import Tokenizer

from services.scheduler.dist_sync import GroupSync, StepInputs, WorldBroken, init_world, keepalive_s
from services.scheduler.dp_attention import DPAttentionLinears, ParallelLayout, build_linears, new_attn_groups
from services.scheduler.engine import Engine, EngineConfig, StepPlan, StepResult
from services.scheduler.model.attention_backends import install_attention_backend
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.llama import local_kv_heads
from services.scheduler.model.loader import load_model, serving_dtype
from services.scheduler.model.mla_pool import kv_bytes_per_token, make_kv_pool
from services.scheduler.request import Req
from shared.actor import Service
from shared.messages import (
    Abort,
    ControlMessage,
    FlushCache,
    LoadReport,
    RankAssignment,
    RankHello,
    RequestError,
    TextBatch,
    TokenBatch,
    TokenizedRequest,
    TokenOutput,
)

MIN_REPORT_GAP = 0.01
REGISTER_RETRY_S = 1.0  # between rank-registry requests while no rank is assigned
MAX_FENCED = 4096  # rids remembered from rank-targeted aborts
DEFAULT_MAX_TOTAL_TOKENS = 65536
# DP attention, every group idle: a leader re-enters the all-gather after this long without
# work of its own, so a group that does get work finds the others in the collective.
IDLE_POLL_S = 0.02
BUS_CLOSE_S = 2.0  # a distributed rank's exit waits at most this long to flush the bus
EXIT_WORLD_BROKEN = 3  # exit status of a rank whose torch.distributed world broke (the launcher restarts it)


def pool_size(
    max_total_tokens: int,
    mem_fraction_static: float,
    bytes_per_token: int,
    device: str,
    kv_cache_bytes: int = 0,
    ranks_sharing_memory: int = 1,
) -> int:
    """KV pool slots of one rank: --max-total-tokens if set, else --kv-cache-bytes (this rank's
    budget), else --mem-fraction-static of the free memory (the GPU's, or on CPU the host's
    MemAvailable split among the `ranks_sharing_memory` scheduler processes), else
    DEFAULT_MAX_TOTAL_TOKENS."""
    if max_total_tokens > 0:
        return max_total_tokens
    if kv_cache_bytes > 0:
        return max(1, kv_cache_bytes // bytes_per_token)
    if mem_fraction_static <= 0:
        return DEFAULT_MAX_TOTAL_TOKENS
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = next(
            int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:")
        ) // max(1, ranks_sharing_memory)
    return max(1, int(free * mem_fraction_static) // bytes_per_token)


def kv_config(config: ModelConfig, attn_tp_size: int) -> ModelConfig:
    """The config whose KV pool one rank holds: MLA's latent is one head, copied on every rank of
    an attention group; other models keep num_key_value_heads / attn_tp_size heads per rank."""
    if config.mla is not None or attn_tp_size == 1:
        return config
    return dataclasses.replace(
        config,
        num_attention_heads=config.num_attention_heads // attn_tp_size,
        num_key_value_heads=local_kv_heads(config, attn_tp_size),
    )


class SchedulerService(Service):
    name = "scheduler"
    needs_model = True  # shared.actor.main resolves --model-path (default model, *.gguf)

    async def start(self) -> None:
        args = self.args
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.layout = ParallelLayout.from_args(args.tp_size, args.dp_size, args.tp_rank, args.enable_dp_attention)
        self.is_leader = self.layout.is_leader
        self.dp_rank = args.dp_rank
        if self.layout.dp_groups > 1:
            if self.dp_rank not in (-1, self.layout.group_index):
                raise ValueError(f"--dp-rank {self.dp_rank} != tp_rank // attn_tp_size ({self.layout.group_index})")
            self.dp_rank = self.layout.group_index
        if self.layout.distributed and self.dp_rank < 0:
            raise ValueError("a tensor-parallel rank needs an explicit --dp-rank (the launcher passes it)")
        self.instance_id = uuid.uuid4().hex[:8]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        if self.is_leader and self.dp_rank >= 0:  # confirm it before loading, so the registry gives it to no one else
            self.spawn(self.register_rank(self.dp_rank))
        self.engine = await asyncio.get_running_loop().run_in_executor(self.executor, self._build_engine)
        if self.dp_rank < 0:
            self.dp_rank = await self.register_rank(None)
        # rid -> {first_seq: dispatch id} of every accepted run that has not emitted its final
        # output (the engine's queues can't tell this mid-step: a prompt being prefilled is in
        # neither). One rid may have two runs here: a gateway that took its request for lost
        # submits it again at a new seq epoch, and the original may turn up after all.
        self.held: dict[str, dict[int, int]] = {}
        self.finished: list[int] = []  # dispatch ids that ended since the last report
        self.fenced: dict[str, None] = {}  # rids the dispatcher took away from this rank (bounded)
        self.inbox: list[Req] = []
        self.inbox_msgs: list[TokenizedRequest] = []  # the inbox as received, for the group's followers
        self.aborts: list[str] = []
        self.flush = False  # a FlushCache waits until the rank is idle
        self.accepted: list[int] = []
        self.wake = asyncio.Event()
        self.report_seq = 0
        self.last_report = 0.0
        if self.is_leader:
            await self.bus.subscribe(self.subjects.sched_req(self.dp_rank), TokenizedRequest, self.on_request)
            await self.bus.subscribe(self.subjects.sched_control, ControlMessage, self.on_control)  # type: ignore[arg-type]
            self.spawn(self.heartbeat())
        self.exit_code = 0
        self.spawn(self.loop())
        self.log.info(
            "dp_rank=%d tp_rank=%d attn_tp_rank=%d attn_tp_size=%d dp_attention=%s instance=%s "
            "max_total_num_tokens=%d max_running_requests=%d",
            self.dp_rank, self.layout.tp_rank, self.layout.attn_tp_rank, self.layout.attn_tp_size,
            self.layout.dp_groups > 1, self.instance_id, self.engine.pool.size, args.max_running_requests,
        )

    def _build_engine(self) -> Engine:
        args, layout = self.args, self.layout
        if layout.distributed:
            if not args.dist_init_addr:
                raise ValueError("--tp-size > 1 needs --dist-init-addr host:port (the launcher passes it)")
            init_world(layout, args.dist_init_addr, args.device, args.dist_timeout)
        attn_group = new_attn_groups(layout) if layout.distributed else None
        self.linears = build_linears(layout, attn_group)
        self.sync = GroupSync(layout, attn_group, args.device)
        dtype = serving_dtype(args.dtype, ModelConfig.from_hf(args.model_path).torch_dtype, args.device)
        model, config = load_model(args.model_path, dtype=dtype, device=args.device, linears=self.linears)
        attention = install_attention_backend(model, args.attention_backend, args.device)
        self.log.info("attention backend: %s (--attention-backend %s)", attention, args.attention_backend)
        context_length = args.context_length or config.max_position_embeddings
        pool_config = kv_config(config, layout.attn_tp_size)
        sharing = args.tp_size * (1 if args.enable_dp_attention else args.dp_size)
        size = pool_size(
            args.max_total_tokens, args.mem_fraction_static, kv_bytes_per_token(pool_config, dtype), args.device,
            kv_cache_bytes=args.kv_cache_bytes, ranks_sharing_memory=sharing,
        )
        pool = make_kv_pool(pool_config, size, dtype, args.device)
        tokenizer = Tokenizer.from_file(str(Path(args.model_path) / "tokenizer.json"))
        cfg = EngineConfig(
            max_total_tokens=size,
            max_running_requests=args.max_running_requests,
            prefill_budget=args.max_prefill_tokens,
            context_length=context_length,
            eos_token_ids=tuple(config.eos_token_ids),
            vocab_size=config.vocab_size,
            chunked_prefill_size=args.chunked_prefill_size,
            schedule_policy=args.schedule_policy,
            disable_radix_cache=args.disable_radix_cache,
        )
        return Engine(model, pool, tokenizer, cfg)

    async def on_request(self, msg: TokenizedRequest) -> None:
        if msg.rid in self.fenced:
            self.log.warning("dropped rid=%s: the dispatcher gave it to another rank", msg.rid)
            return
        refused = self._refusal(msg)
        if refused is not None:
            await self._refuse(msg, *refused)
            return
        self.inbox.append(Req.from_msg(msg))
        self.inbox_msgs.append(msg)
        self.accepted.append(msg.dispatch_id)
        self.held.setdefault(msg.rid, {})[msg.first_seq] = msg.dispatch_id
        self.wake.set()

    def _finished_run(self, rid: str, seq: int) -> None:
        """The run of `rid` whose step `seq` was its last is done: the dispatcher hears it finished.
        A run's seqs start at its first_seq, and each epoch's first_seq is above every seq of the
        earlier ones, so the run is the one with the largest first_seq <= seq."""
        runs = self.held[rid]
        first = max((f for f in runs if f <= seq), default=None)
        if first is None:
            return
        self.finished.append(runs.pop(first))
        if not runs:
            del self.held[rid]

    def _refusal(self, msg: TokenizedRequest) -> tuple[str, int] | None:
        """(message, HTTP status) when this rank will not take `msg`: its waiting queue is full
        (--max-queued-requests-per-rank; 429, the gateway adds Retry-After), or the request carries
        values that would break a step (they never pass the tokenizer; this guards the bus)."""
        if msg.first_seq in self.held.get(msg.rid, ()):
            # another gateway's request with the same rid (gateways refuse their own repeats)
            return f"a request with rid {msg.rid!r} is already in progress on DP rank {self.dp_rank}", 400
        bound = self.args.max_queued_requests_per_rank
        waiting = len(self.engine.waiting) + len(self.inbox)
        if bound > 0 and waiting >= bound:
            return f"DP rank {self.dp_rank} is overloaded: {waiting} requests waiting; retry later", 429
        vocab = self.engine.cfg.vocab_size
        if any(not 0 <= t < vocab for t in msg.sampling.stop_token_ids):
            return f"stop_token_ids must be in [0, {vocab})", 400
        problem = msg.sampling.problem()
        if problem is not None:
            return problem, 400
        return None

    async def _refuse(self, msg: TokenizedRequest, message: str, status: int) -> None:
        """Answers the gateway at once; the dispatcher sees the request accepted and finished."""
        self.log.warning("refused rid=%s status=%d: %s", msg.rid, status, message)
        self.accepted.append(msg.dispatch_id)
        self.finished.append(msg.dispatch_id)
        error = RequestError(rid=msg.rid, message=message, status=status)
        await self.bus.publish(self.subjects.out(msg.gateway_id), TextBatch(outputs=[error]))

    async def on_control(self, msg: Abort | FlushCache) -> None:
        if isinstance(msg, Abort):
            if msg.dp_rank is not None:
                if msg.dp_rank != self.dp_rank or msg.instance_id not in ("", self.instance_id):
                    return
                self.fenced[msg.rid] = None  # it may still be on its way here
                if len(self.fenced) > MAX_FENCED:
                    del self.fenced[next(iter(self.fenced))]
            self.aborts.append(msg.rid)
            self.wake.set()
        elif isinstance(msg, FlushCache):
            self.flush = True
            self.wake.set()

    async def _step_inputs(self) -> tuple[list[Req], list[str], bool]:
        """This step's new requests, aborts and flush flag: the leader's own, shared with its group."""
        loop = asyncio.get_running_loop()
        if self.is_leader:
            reqs, msgs, aborts = self.inbox, self.inbox_msgs, self.aborts
            self.inbox, self.inbox_msgs, self.aborts = [], [], []
            if self.layout.attn_tp_size > 1:
                shared = StepInputs(reqs=msgs, aborts=aborts, flush=self.flush)
                await loop.run_in_executor(self.executor, self.sync.share_inputs, shared)
            return reqs, aborts, self.flush
        got = await loop.run_in_executor(self.executor, self.sync.share_inputs, None)
        return [Req.from_msg(m) for m in got.reqs], list(got.aborts), got.flush

    def _absorb(self, reqs: list[Req], aborts: list[str], flush: bool) -> bool:
        """Moves the step's inputs into the engine; True if anything changed."""
        changed = bool(reqs or aborts)
        for req in reqs:
            self.engine.add(req)
        for rid in aborts:
            if self.engine.abort(rid) is not None:
                self.log.info("abort rid=%s", rid)
        if flush and not self.engine.has_work:
            self.flush = False
            self.log.info("flush_cache freed=%d", self.engine.flush_cache())
        return changed

    def _forward(self, plan: StepPlan | None, counts: list[int]) -> StepResult | None:
        """Forward thread: the model on this group's batch (None: an idle batch), then the group's
        sampled tokens made equal to the leader's."""
        if isinstance(self.linears, DPAttentionLinears):
            self.linears.step_tokens = counts
        if plan is None:
            self.engine.forward_idle()
            return None
        result = self.engine.forward(plan)
        result.sampled.tokens = self.sync.share_tokens(result.sampled.tokens)
        return result

    async def loop(self) -> None:
        try:
            await self._steps()
        except WorldBroken as e:
            self.log.error(
                "torch.distributed world broken (tp_rank=%d dp_rank=%d): %s; exiting with status %d so the "
                "launcher restarts the world", self.layout.tp_rank, self.dp_rank, e, EXIT_WORLD_BROKEN,
            )
            self.exit_code = EXIT_WORLD_BROKEN
            self.stopping.set()
        except Exception:
            self.exit_code = 1
            raise

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            changed = self._absorb(*await self._step_inputs())
            plan = self.engine.schedule()
            num_tokens = plan.batch.num_tokens if plan is not None else 0
            counts = [num_tokens]
            if self.layout.dp_groups > 1:
                counts = await loop.run_in_executor(self.executor, self.sync.gather_counts, num_tokens)
            if not any(counts):
                await self._idle(changed)
                continue
            try:
                result = await loop.run_in_executor(self.executor, self._forward, plan, counts)
            except Exception as e:
                if isinstance(e, WorldBroken):
                    raise
                if self.layout.distributed:
                    # its peers may be inside a collective this rank skipped: it can't stay in step
                    raise WorldBroken(f"forward step failed: {e!r}") from e
                assert plan is not None  # idle batches run in distributed worlds only
                self.log.exception("forward failed; ending the %d requests of this step", len(plan.reqs))
                outputs = self.engine.fail(plan, f"internal error in the forward step: {e!r}")
            else:
                if plan is None or result is None:
                    outputs = self.engine.drain_finished_early()
                else:
                    outputs = self.engine.update(plan, result)
            await self.emit(outputs)
            if time.monotonic() - self.last_report >= MIN_REPORT_GAP:
                await self.report()

    async def _idle(self, changed: bool) -> None:
        """No group has work: report what ended outside a step, then (leader) wait for input."""
        outputs = self.engine.drain_finished_early()
        await self.emit(outputs)
        if changed or outputs:
            await self.report()
        if not self.engine.has_work:
            self.engine.assert_idle_invariants()
        if not self.is_leader:
            return  # a follower waits in its next share_inputs
        self.wake.clear()
        if self.inbox or self.aborts:
            return
        if self.layout.dp_groups > 1:
            poll: float | None = IDLE_POLL_S
        elif self.layout.attn_tp_size > 1:  # followers wait in share_inputs: keep them inside the timeout
            poll = keepalive_s(self.args.dist_timeout)
        else:
            poll = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), poll)

    async def emit(self, outputs: list[TokenOutput]) -> None:
        if not outputs or not self.is_leader:
            return
        for out in outputs:
            if out.finish is not None and out.rid in self.held:
                self._finished_run(out.rid, out.seq)
        # A fenced rid was given to another rank (or instance): its "aborted" end here must not
        # reach the gateway, which now follows the other placement.
        outputs = [o for o in outputs if not (o.rid in self.fenced and o.finish and o.finish.type == "abort")]
        if outputs:
            await self.bus.publish(self.subjects.detok, TokenBatch(dp_rank=self.dp_rank, outputs=outputs))

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_interval / 2)
            if time.monotonic() - self.last_report >= self.args.heartbeat_interval:
                await self.report()

    async def report(self) -> None:
        if not self.is_leader:
            return
        engine = self.engine
        self.report_seq += 1
        self.last_report = time.monotonic()
        accepted, self.accepted = self.accepted, []
        finished, self.finished = self.finished, []
        await self.bus.publish(
            self.subjects.load(self.dp_rank),
            LoadReport(
                dp_rank=self.dp_rank,
                seq=self.report_seq,
                timestamp=self.last_report,
                holding_tokens=engine.holding_tokens + sum(r.seq_len for r in self.inbox),
                num_running=len(engine.running),
                num_waiting=len(engine.waiting) + len(self.inbox),
                kv_used=engine.kv_used,
                kv_total=engine.pool.size,
                cache_hit_rate=engine.cache.hit_rate,
                accepted=accepted,
                instance_id=self.instance_id,
                finished=finished,
            ),
        )

    async def register_rank(self, requested: int | None) -> int:
        """Asks the dispatcher's rank registry for a dp_rank (or confirms `requested`); retries until
        it answers with one."""
        hello = RankHello(instance_id=self.instance_id, requested_dp_rank=requested)
        while True:
            try:
                answer = await self.bus.request(self.subjects.rank_register, hello, RankAssignment, timeout=1.0)
            except Exception as e:  # no dispatcher yet, or a timeout
                self.log.info("waiting for the rank registry: %r", e)
            else:
                if answer.dp_rank is not None:
                    self.log.info("rank registry assigned dp_rank=%d (%s)", answer.dp_rank, answer.message)
                    return answer.dp_rank
                self.log.warning("rank registry: %s", answer.message)
            await asyncio.sleep(REGISTER_RETRY_S)

    async def stop(self) -> None:
        if not self.layout.distributed:
            self.executor.shutdown(wait=True, cancel_futures=True)
            return
        # The forward thread may be blocked in a collective its peers will never join: close the
        # bus (flushing what was published), then leave without joining that thread.
        self.log.info("stopped (tp_rank=%d status=%d)", self.layout.tp_rank, self.exit_code)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.bus.close(), BUS_CLOSE_S)
        os._exit(self.exit_code)
