"""The scheduler service of one rank: NATS in, engine steps, token batches and load reports out.

A thin driver over its parts: `setup` builds the rank (on the forward thread), `Inbox` holds what
arrived since the last step boundary, `RunLedger` what the dispatcher must hear about the runs it
sent, `StepProtocol` the rank's part in its world's step, `DispatcherClient` the load reports and
the rank registry. One step: absorb the inbox -> engine.schedule -> (the world's step) ->
engine.update -> publish outputs -> report.

Under tensor parallelism (`--tp-size` > 1) the rank is one of a torch.distributed world. Only a
group leader (attn_tp_rank 0) talks to NATS; its followers receive the step's inputs and sampled
tokens from it, so every rank of a group holds the same requests in the same order.

A broken world (a collective failed or timed out after --dist-timeout: a peer died or hangs; or
a forward step raised, which leaves this rank out of step with its peers) ends the process with
status EXIT_WORLD_BROKEN and no error to its requests: the launcher restarts the whole world, and
the dispatcher, seeing the group's heartbeats stop, migrates its requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from services.scheduler.disagg.decode_side import DecodeSide
from services.scheduler.disagg.metrics import DisaggMetrics
from services.scheduler.disagg.prefill_side import PrefillSide
from services.scheduler.disagg.transfer import GlooTransferEngine, TransferEngine, bootstrap_host
from services.scheduler.dispatcher_client import MIN_REPORT_GAP, DispatcherClient
from services.scheduler.dist_sync import WorldBroken
from services.scheduler.engine import Engine
from services.scheduler.inbox import Inbox
from services.scheduler.ledger import RunLedger
from services.scheduler.request import Req
from services.scheduler.setup import build_rank, dp_rank_of, layout_of
from services.scheduler.step_protocol import StepProtocol
from shared.actor import Service
from shared.config import ServerArgs
from shared.messages import (
    Abort,
    ControlMessage,
    FlushCache,
    LoadReport,
    PrefillDone,
    PrefillTask,
    TokenBatch,
    TokenizedRequest,
    TokenOutput,
)
from shared.metrics import publish_snapshots

BUS_CLOSE_S = 2.0  # a distributed rank's exit waits at most this long to flush the bus
EXIT_WORLD_BROKEN = 3  # exit status of a rank whose torch.distributed world broke (the launcher restarts it)


class SchedulerService(Service):
    name = "scheduler"
    needs_model = True  # shared.actor.main resolves --model-path (default model, *.gguf)

    def __init__(self, args: ServerArgs) -> None:
        super().__init__(args)
        self.layout = layout_of(args)
        self.is_leader = self.layout.is_leader
        self.dp_rank = dp_rank_of(args, self.layout)  # -1 until the rank registry assigns one
        self.instance_id = uuid.uuid4().hex[:8]
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        self.inbox = Inbox()
        self.ledger = RunLedger()
        self.exit_code = 0
        self.mode = args.disaggregation_mode
        self.prefill_side: PrefillSide | None = None  # --disaggregation-mode prefill (the leader)
        self.decode_side: DecodeSide | None = None  # --disaggregation-mode decode (the leader)
        self.transfer: TransferEngine | None = None
        # built in start(): they need the bus, or the rank built on the forward thread
        self.dispatcher: DispatcherClient
        self.engine: Engine
        self.world: StepProtocol

    async def start(self) -> None:
        args = self.args
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        self.dispatcher = DispatcherClient(self.bus, self.subjects, self.instance_id, self.log, node_rank=args.node_rank)
        if self.is_leader and self.dp_rank >= 0:  # confirm it before loading, so the registry gives it to no one else
            self.spawn(self.dispatcher.register_rank(self.dp_rank))
        loop = asyncio.get_running_loop()
        try:
            rank = await loop.run_in_executor(self.executor, build_rank, args, self.layout, self.log)
        except WorldBroken as e:  # its peers did not come: the launcher restarts the world
            self.log.error("could not join its torch.distributed world (tp_rank=%d): %s; exiting with status %d",
                           self.layout.tp_rank, e, EXIT_WORLD_BROKEN)
            os._exit(EXIT_WORLD_BROKEN)
        self.engine = rank.engine
        self.world = StepProtocol(self.layout, rank.engine, rank.sync, rank.linears, self.executor)
        if self.dp_rank < 0:
            self.dp_rank = await self.dispatcher.register_rank(None)
        if self.is_leader:
            await self.bus.subscribe(self.subjects.sched_req(self.dp_rank), TokenizedRequest, self.on_request)
            await self.bus.subscribe(self.subjects.sched_control, ControlMessage, self.on_control)  # type: ignore[arg-type]
            if self.mode != "null":
                await self.start_disaggregation()
            self.spawn(self.heartbeat())
        self.spawn(self.loop())
        self.log.info(
            "dp_rank=%d tp_rank=%d attn_tp_rank=%d attn_tp_size=%d dp_attention=%s instance=%s "
            "max_total_num_tokens=%d max_running_requests=%d chunked_prefill_size=%d",
            self.dp_rank, self.layout.tp_rank, self.layout.attn_tp_rank, self.layout.attn_tp_size,
            self.layout.dp_groups > 1, self.instance_id, self.engine.pool.size, args.max_running_requests,
            self.engine.cfg.chunked_prefill_size,
        )

    async def start_disaggregation(self) -> None:
        """The leader's side of prefill/decode disaggregation: its transfer engine, its handlers
        and its metrics."""
        args = self.args
        metrics = DisaggMetrics(self.dp_rank, self.mode)
        self.transfer = GlooTransferEngine(self.mode, bootstrap_host(args.node_addr, args.nats_url))
        if self.mode == "prefill":
            self.prefill_side = PrefillSide(self.bus, self.subjects, self.transfer, self.instance_id, metrics,
                                            self.spawn, self.log)
            await self.bus.subscribe(self.subjects.sched_prefill(self.dp_rank), PrefillTask, self.on_task)
        else:
            loop = asyncio.get_running_loop()
            dead_after = max(args.dead_rank_timeout, 3 * args.heartbeat_interval)
            self.decode_side = DecodeSide(
                self.bus, self.subjects, self.transfer, self.engine, self.dp_rank, self.instance_id,
                args.disaggregation_transfer_timeout, dead_after, args.disaggregation_min_prompt_tokens, metrics,
                lambda: loop.call_soon_threadsafe(self.inbox.wake.set), self.log,
            )
            await self.bus.subscribe(self.subjects.sched_kv(self.dp_rank), PrefillDone, self.decode_side.on_done)
            await self.bus.subscribe(self.subjects.load_all, LoadReport, self.decode_side.on_load)
        self.spawn(publish_snapshots(self.bus, self.subjects.metrics, "scheduler", self.instance_id, metrics.samples))
        self.log.info("disaggregation mode=%s transfer=%s bootstrap=%s", self.mode,
                      args.disaggregation_transfer_backend, self.transfer.bootstrap_addr or "-")

    # --- the inbox ---------------------------------------------------------------------------------

    async def on_request(self, msg: TokenizedRequest) -> None:
        if self.ledger.is_fenced(msg.rid):
            self.log.warning("dropped rid=%s: the dispatcher gave it to another rank", msg.rid)
            return
        refused = self._refusal(msg)
        if refused is not None:
            message, status = refused
            self.log.warning("refused rid=%s status=%d: %s", msg.rid, status, message)
            self.ledger.refuse(msg)  # the dispatcher sees it accepted and finished
            await self.reply_error(msg.gateway_id, msg.rid, message, status)
            return
        self.ledger.accept(msg)
        self.inbox.add(msg)

    def _refusal(self, msg: TokenizedRequest) -> tuple[str, int] | None:
        """(message, HTTP status) when this rank will not take `msg`: its waiting queue is full
        (--max-queued-requests-per-rank; 429, the gateway adds Retry-After), or the request carries
        values that would break a step (they never pass the tokenizer; this guards the bus)."""
        if self.ledger.holds(msg):
            # another gateway's request with the same rid (gateways refuse their own repeats)
            return f"a request with rid {msg.rid!r} is already in progress on DP rank {self.dp_rank}", 400
        bound = self.args.max_queued_requests_per_rank
        waiting = len(self.engine.waiting) + len(self.inbox.reqs)
        if bound > 0 and waiting >= bound:
            return f"DP rank {self.dp_rank} is overloaded: {waiting} requests waiting; retry later", 429
        vocab = self.engine.cfg.vocab_size
        if any(not 0 <= t < vocab for t in msg.sampling.stop_token_ids):
            return f"stop_token_ids must be in [0, {vocab})", 400
        problem = msg.sampling.problem()
        if problem is not None:
            return problem, 400
        return None

    async def on_task(self, task: PrefillTask) -> None:
        """A prefill rank's task from a decode rank (no dispatcher run: the decode rank owns it)."""
        assert self.prefill_side is not None
        refused = self._refusal(task.req)  # the checks a request from the dispatcher gets
        msg = self.prefill_side.take_task(task, refused[0] if refused is not None else None)
        if msg is not None:
            self.inbox.add(msg)

    async def on_control(self, msg: Abort | FlushCache) -> None:
        if isinstance(msg, Abort):
            if msg.dp_rank is not None:
                if msg.dp_rank != self.dp_rank or msg.instance_id not in ("", self.instance_id):
                    return
                self.ledger.fence(msg.rid)  # it may still be on its way here
            self.inbox.abort(msg.rid)
        elif isinstance(msg, FlushCache):
            self.inbox.request_flush()

    # --- the step loop -----------------------------------------------------------------------------

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
        stepped = False  # a step ran since the last idle pass
        while True:
            changed = await self._absorb()
            plan = self.engine.schedule()
            counts = await self.world.gather_counts(plan)
            if not any(counts):
                await self._idle(changed or stepped)
                stepped = False
                continue
            stepped = True
            try:
                result = await self.world.forward(plan, counts)
            except WorldBroken:
                raise
            except Exception as e:
                assert plan is not None  # idle batches run in distributed worlds only
                self.log.exception("forward failed; ending the %d requests of this step", len(plan.reqs))
                outputs = self.engine.fail(plan, f"internal error in the forward step: {e!r}")
            else:
                outputs = self.engine.update(plan, result)
            await self.emit(outputs)
            if self.dispatcher.since_report() >= MIN_REPORT_GAP:
                await self.report()

    async def _absorb(self) -> bool:
        """Moves this step's inputs (the leader's own, shared with its group) into the engine;
        True if anything changed."""
        if self.is_leader:
            reqs, inputs = self.inbox.take()
            await self.world.share_inputs(inputs)
        else:
            inputs = await self.world.share_inputs(None)
            reqs = [Req.from_msg(m) for m in inputs.reqs]
        constraints = [r.sampling.grammar for r in reqs if r.sampling.grammar is not None]
        if constraints:  # compiled off the event loop; engine.add then finds them cached
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.grammars.prepare, constraints)
        if self.prefill_side is not None:
            self.prefill_side.mark(reqs)
        for req, msg in zip(reqs, inputs.reqs, strict=True):
            if self.decode_side is not None:
                await self.decode_side.add(req, msg)
            else:
                self.engine.add(req)
        installed = await self.decode_side.poll() if self.decode_side is not None else []
        await self.emit(installed)  # the first tokens of requests a prefill rank prefilled
        for rid in inputs.aborts:
            if self.engine.abort(rid) is not None:
                self.log.info("abort rid=%s", rid)
        if inputs.flush and not self.engine.has_work:
            self.inbox.flushed()
            self.log.info("flush_cache freed=%d", self.engine.flush_cache())
        return bool(reqs or inputs.aborts or installed)

    async def _idle(self, changed: bool) -> None:
        """No group has work: report what ended outside a step, or that the rank just went idle (its
        last steps' reports may have been skipped under MIN_REPORT_GAP, and the dispatcher would
        count the requests they finished as running until the next heartbeat), then (leader) wait
        for input."""
        outputs = self.engine.drain_finished_early()
        await self.emit(outputs)
        if changed or outputs:
            await self.report()
        if not self.engine.has_work:
            self.engine.assert_idle_invariants()
        if self.is_leader:  # a follower waits in its next share_inputs
            wait = self.world.idle_wait_s(self.args.dist_timeout)
            poll = self.decode_side.waiting_s if self.decode_side is not None else None
            if poll is not None:  # transfers pending: poll them soon
                wait = poll if wait is None else min(wait, poll)
            await self.inbox.wait(wait)

    async def emit(self, outputs: list[TokenOutput]) -> None:
        if self.prefill_side is not None:  # its tasks' outputs go back to their decode ranks
            outputs = self.prefill_side.intercept(outputs, self.engine.take_shipped())
        if not outputs or not self.is_leader:
            return
        outputs = self.ledger.publishable(outputs)
        if outputs:
            await self.bus.publish(self.subjects.detok, TokenBatch(dp_rank=self.dp_rank, outputs=outputs))

    # --- the dispatcher ----------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        interval = self.args.heartbeat_interval
        while True:
            await asyncio.sleep(interval / 2)
            if self.dispatcher.since_report() >= interval:
                await self.report()

    async def report(self) -> None:
        if self.is_leader:
            tasks = self.prefill_side.take_report() if self.prefill_side is not None else None
            bootstrap = self.transfer.bootstrap_addr if self.transfer is not None else ""
            await self.dispatcher.report(self.dp_rank, self.engine, self.inbox, *self.ledger.take_report(),
                                         mode=self.mode, bootstrap_addr=bootstrap, tasks_accepted=tasks)

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
