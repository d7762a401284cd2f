"""The scheduler service of one DP rank: NATS in, engine steps, token batches and load reports out.

Requests and aborts that arrive while a step runs wait in the inbox and enter the engine at the
next step boundary. The leader reports its load after every step that changed it (at most every
`MIN_REPORT_GAP` s) and at least every heartbeat interval.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tokenizers import Tokenizer

from services.scheduler.engine import Engine, EngineConfig
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.model.loader import load_model
from services.scheduler.request import Req
from shared.actor import Service
from shared.messages import (
    Abort,
    ControlMessage,
    FlushCache,
    LoadReport,
    RankAssignment,
    RankHello,
    TokenBatch,
    TokenizedRequest,
    TokenOutput,
)

MIN_REPORT_GAP = 0.01
REGISTER_RETRY_S = 1.0  # between rank-registry requests while no rank is assigned
MAX_FENCED = 4096  # rids remembered from rank-targeted aborts
DEFAULT_MAX_TOTAL_TOKENS = 65536


def pool_size(max_total_tokens: int, mem_fraction_static: float, bytes_per_token: int, device: str) -> int:
    """KV pool slots: --max-total-tokens if set, else --mem-fraction-static of the free memory
    (the GPU's, or the host's MemAvailable on CPU), else DEFAULT_MAX_TOTAL_TOKENS."""
    if max_total_tokens > 0:
        return max_total_tokens
    if mem_fraction_static <= 0:
        return DEFAULT_MAX_TOTAL_TOKENS
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = next(
            int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable:")
        )
    return max(1, int(free * mem_fraction_static) // bytes_per_token)


class SchedulerService(Service):
    name = "scheduler"

    async def start(self) -> None:
        args = self.args
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.dp_rank = args.dp_rank
        self.instance_id = uuid.uuid4().hex[:8]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        if self.dp_rank >= 0:  # confirm it before loading, so the registry gives it to no one else
            self.spawn(self.register_rank(self.dp_rank))
        self.engine = await asyncio.get_running_loop().run_in_executor(self.executor, self._build_engine)
        if self.dp_rank < 0:
            self.dp_rank = await self.register_rank(None)
        # rid -> dispatch id of every accepted request that has not emitted its final output; the
        # engine's queues can't tell this mid-step (a prompt being prefilled is in neither)
        self.held: dict[str, int] = {}
        self.finished: list[int] = []  # dispatch ids that ended since the last report
        self.fenced: dict[str, None] = {}  # rids the dispatcher took away from this rank (bounded)
        self.inbox: list[Req] = []
        self.aborts: list[str] = []
        self.flush = False  # a FlushCache waits until the rank is idle
        self.accepted: list[int] = []
        self.wake = asyncio.Event()
        self.report_seq = 0
        self.last_report = 0.0
        await self.bus.subscribe(self.subjects.sched_req(self.dp_rank), TokenizedRequest, self.on_request)
        await self.bus.subscribe(self.subjects.sched_control, ControlMessage, self.on_control)  # type: ignore[arg-type]
        self.spawn(self.loop())
        self.spawn(self.heartbeat())
        self.log.info(
            "dp_rank=%d instance=%s max_total_num_tokens=%d max_running_requests=%d",
            self.dp_rank, self.instance_id, self.engine.pool.size, args.max_running_requests,
        )

    def _build_engine(self) -> Engine:
        args = self.args
        dtype = getattr(torch, args.dtype)
        model, config = load_model(args.model_path, dtype=dtype, device=args.device)
        context_length = args.context_length or config.max_position_embeddings
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize
        size = pool_size(args.max_total_tokens, args.mem_fraction_static, per_token, args.device)
        pool = KVPool(config.num_hidden_layers, size, config.num_key_value_heads, config.head_dim, dtype, args.device)
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
        self.inbox.append(Req.from_msg(msg))
        self.accepted.append(msg.dispatch_id)
        self.held[msg.rid] = msg.dispatch_id
        self.wake.set()

    async def on_control(self, msg: Abort | FlushCache) -> None:
        if isinstance(msg, Abort):
            if msg.dp_rank is not None:
                if msg.dp_rank != self.dp_rank:
                    return
                self.fenced[msg.rid] = None  # it may still be on its way here
                if len(self.fenced) > MAX_FENCED:
                    del self.fenced[next(iter(self.fenced))]
            self.aborts.append(msg.rid)
            self.wake.set()
        elif isinstance(msg, FlushCache):
            self.flush = True
            self.wake.set()

    def _absorb(self) -> bool:
        """Moves the inbox and aborts into the engine; True if anything changed."""
        changed = bool(self.inbox or self.aborts)
        for req in self.inbox:
            self.engine.add(req)
        self.inbox.clear()
        for rid in self.aborts:
            if self.engine.abort(rid) is not None:
                self.log.info("abort rid=%s", rid)
        self.aborts.clear()
        if self.flush and not self.engine.has_work:
            self.flush = False
            self.log.info("flush_cache freed=%d", self.engine.flush_cache())
        return changed

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            changed = self._absorb()
            plan = self.engine.schedule()
            if plan is None:
                outputs = self.engine.drain_finished_early()
                await self.emit(outputs)
                if changed or outputs:
                    await self.report()
                if not self.engine.has_work:
                    self.engine.check_idle_accounting()
                self.wake.clear()
                if not (self.inbox or self.aborts):
                    await self.wake.wait()
                continue
            try:
                result = await loop.run_in_executor(self.executor, self.engine.forward, plan)
            except Exception as e:
                self.log.exception("forward failed; ending the %d requests of this step", len(plan.reqs))
                outputs = self.engine.fail(plan, f"internal error in the forward step: {e!r}")
            else:
                outputs = self.engine.update(plan, result)
            await self.emit(outputs)
            if time.monotonic() - self.last_report >= MIN_REPORT_GAP:
                await self.report()

    async def emit(self, outputs: list[TokenOutput]) -> None:
        if not outputs:
            return
        for out in outputs:
            if out.finish is not None and out.rid in self.held:
                self.finished.append(self.held.pop(out.rid))
        await self.bus.publish(self.subjects.detok, TokenBatch(dp_rank=self.dp_rank, outputs=outputs))

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_interval / 2)
            if time.monotonic() - self.last_report >= self.args.heartbeat_interval:
                await self.report()

    async def report(self) -> None:
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
        self.executor.shutdown(wait=True, cancel_futures=True)
