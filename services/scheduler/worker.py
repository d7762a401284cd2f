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
from shared.messages import Abort, ControlMessage, FlushCache, LoadReport, TokenBatch, TokenizedRequest

MIN_REPORT_GAP = 0.01
DEFAULT_MAX_TOTAL_TOKENS = 65536
DEFAULT_PREFILL_BUDGET = 8192


class SchedulerService(Service):
    name = "scheduler"

    async def start(self) -> None:
        args = self.args
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.dp_rank = args.dp_rank
        self.instance_id = uuid.uuid4().hex[:8]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.engine = await asyncio.get_running_loop().run_in_executor(self.executor, self._build_engine)
        self.inbox: list[Req] = []
        self.aborts: list[str] = []
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
        size = args.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS
        pool = KVPool(config.num_hidden_layers, size, config.num_key_value_heads, config.head_dim, dtype, args.device)
        tokenizer = Tokenizer.from_file(str(Path(args.model_path) / "tokenizer.json"))
        cfg = EngineConfig(
            max_total_tokens=size,
            max_running_requests=args.max_running_requests,
            prefill_budget=DEFAULT_PREFILL_BUDGET,
            context_length=context_length,
            eos_token_ids=tuple(config.eos_token_ids),
            vocab_size=config.vocab_size,
        )
        return Engine(model, pool, tokenizer, cfg)

    async def on_request(self, msg: TokenizedRequest) -> None:
        self.inbox.append(Req.from_msg(msg))
        self.accepted.append(msg.dispatch_id)
        self.wake.set()

    async def on_control(self, msg: Abort | FlushCache) -> None:
        if isinstance(msg, Abort):
            self.aborts.append(msg.rid)
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
        return changed

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            changed = self._absorb()
            plan = self.engine.schedule()
            if plan is None:
                outputs = self.engine.drain_finished_early()
                if outputs:
                    await self.bus.publish(self.subjects.detok, TokenBatch(dp_rank=self.dp_rank, outputs=outputs))
                if changed or outputs:
                    await self.report()
                if not self.engine.has_work:
                    self.engine.check_idle_accounting()
                self.wake.clear()
                if not (self.inbox or self.aborts):
                    await self.wake.wait()
                continue
            try:
                tokens = await loop.run_in_executor(self.executor, self.engine.forward, plan)
            except Exception as e:
                self.log.exception("forward failed; ending the %d requests of this step", len(plan.reqs))
                outputs = self.engine.fail(plan, f"internal error in the forward step: {e!r}")
            else:
                outputs = self.engine.update(plan, tokens)
            if outputs:
                await self.bus.publish(self.subjects.detok, TokenBatch(dp_rank=self.dp_rank, outputs=outputs))
            if time.monotonic() - self.last_report >= MIN_REPORT_GAP:
                await self.report()

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
                accepted=accepted,
                instance_id=self.instance_id,
            ),
        )

    async def stop(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
