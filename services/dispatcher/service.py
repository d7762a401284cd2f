"""The dispatcher service: tokenized requests in, one DP rank chosen for each.

It keeps the load table from the leaders' heartbeats and the requests it sent, and the rank
registry. While no rank is live, requests wait in a bounded queue and fail with a clear error once
they waited `PENDING_TIMEOUT` seconds. When a rank dies (or restarts as a new instance), its
unaccepted requests go to the live ranks, its accepted ones migrate (migration.py;
`--disable-migration`: a 503 error), and every one of them is aborted on that rank alone, so a
frozen process that resumes does not serve them twice.
A LoadReport reaches the load table only if the rank registry admits it (registry.py): one from an
instance other than the live holder of its rank is ignored, so a bus client cannot take a rank over.
Every timestamp comes from `clock` (the load table, the registry, the queue, parked requests), so
tests drive time with a fake clock.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable

from services.dispatcher.disaggregation import Disaggregation, DisaggregationConfig
from services.dispatcher.loads import LoadTable, Outcome, RankState
from services.dispatcher.metrics import DispatcherMetrics
from services.dispatcher.migration import PARK_TIMEOUT, Migrations
from services.dispatcher.policies import Policy, PolicyConfig, make_policy
from services.dispatcher.registry import RankRegistry
from shared.actor import Service
from shared.bounded import BoundedDict
from shared.config import ServerArgs
from shared.log import Throttle
from shared.messages import (
    Abort,
    LoadReport,
    LoadTableQuery,
    LoadTableReply,
    RankAssignment,
    RankHello,
    Resume,
    ResumeReply,
    TextBatch,
    TokenizedRequest,
)
from shared.metrics import Sample, publish_snapshots

PENDING_TIMEOUT = 30.0  # seconds a request may wait for a live rank
MAX_PENDING = 4096
REGISTRATION_GRACE = 10.0  # seconds an assigned rank may stay silent before it is free again
MAX_FENCED = 8192  # rids remembered in `fenced`, the oldest forgotten first


class DispatcherService(Service):
    name = "dispatcher"

    def __init__(self, args: ServerArgs, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(args)
        self.clock = clock
        self.dead_after = max(args.dead_rank_timeout, 3 * args.heartbeat_interval)
        self.table = LoadTable(self.dead_after, clock)
        self.registry = RankRegistry(
            args.dp_size, grace=max(REGISTRATION_GRACE, self.dead_after), dead_after=self.dead_after
        )
        config = PolicyConfig(
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
            max_tree_size=args.max_tree_size,
        )
        self.policy: Policy = make_policy(args.load_balance_method, config=config)
        self.metrics = DispatcherMetrics(args.load_balance_method)
        self.disaggregation = Disaggregation(
            DisaggregationConfig(
                min_prompt_tokens=args.disaggregation_min_prompt_tokens,
                max_prefill_queue=args.disaggregation_max_prefill_queue,
                cache_threshold=args.cache_threshold,
                max_tree_size=args.max_tree_size,
            ),
            clock,
        )
        self.migrations = Migrations(clock)
        self.dispatch_ids = itertools.count(1)
        self.pending: deque[tuple[float, TokenizedRequest]] = deque()  # (clock() when queued, request)
        # rid -> (dp_rank, instance) told to drop it (rank-targeted Abort): that instance would drop
        # it again, so a migrated or re-run request goes elsewhere; a restarted instance of the
        # same rank never saw the abort and may take it
        self.fenced: BoundedDict[str, set[tuple[int, str]]] = BoundedDict(MAX_FENCED)
        self.dropped_reports = Throttle(first=20)  # LoadReports with nonsense fields (report_problem)
        self.ignored_reports = Throttle()  # well-formed LoadReports of an instance that does not hold the rank
        self.refused_hellos = Throttle()  # RankHellos answered without a rank (a scheduler asks every second)

    async def start(self) -> None:
        await self.bus.subscribe(self.subjects.dispatch, TokenizedRequest, self.on_request)
        await self.bus.subscribe(self.subjects.load_all, LoadReport, self.on_report)
        await self.bus.serve(self.subjects.dispatcher_loads, LoadTableQuery, self.on_query)
        await self.bus.serve(self.subjects.rank_register, RankHello, self.on_hello)
        await self.bus.serve(self.subjects.dispatcher_resume, Resume, self.on_resume)
        self.spawn(self.watch_ranks())
        rows = self.metrics.collector(self.table.rows, lambda: len(self.pending))

        def collect() -> list[Sample]:
            return rows() + self.disaggregation.samples()

        self.spawn(publish_snapshots(self.bus, self.subjects.metrics, "dispatcher", uuid.uuid4().hex, collect))
        self.log.info("method=%s dead_after=%.2fs", self.args.load_balance_method, self.dead_after)

    async def on_request(self, req: TokenizedRequest) -> None:
        req.dispatch_id = next(self.dispatch_ids)
        await self.dispatch(req)

    async def dispatch(self, req: TokenizedRequest) -> None:
        live = self.table.live_ranks()
        prefill = [r for r in live if r.mode == "prefill"]  # they take tasks from decode ranks, not requests
        if prefill:
            live = [r for r in live if r.mode != "prefill"]
        if req.routed_dp_rank is not None and req.routed_dp_rank in {r.dp_rank for r in prefill}:
            await self.fail(req, f"routed_dp_rank {req.routed_dp_rank} is a prefill rank; route to a decode rank", 400)
            return
        avoid = self.fenced.get(req.rid)
        if avoid and live:
            live = [r for r in live if (r.dp_rank, r.instance_id) not in avoid]
            if not live and req.routed_dp_rank is None:
                await self.fail(req, "every live DP rank had to drop this request after a failure", 503)
                return
        if req.routed_dp_rank is not None:
            if req.routed_dp_rank not in {r.dp_rank for r in live}:
                await self.fail(req, f"routed_dp_rank {req.routed_dp_rank} is not a live DP rank", 400)
                return
            rank = self.table.rank(req.routed_dp_rank)
        elif not live:
            if len(self.pending) >= MAX_PENDING:
                await self.fail(req, "no live scheduler rank and the dispatch queue is full", 503)
            else:
                self.pending.append((self.clock(), req))
            return
        else:
            rank = self.policy.pick(req, live)
        req.prefill_dp_rank = None
        if prefill:
            self.disaggregation.place(req, self.policy.cached_tokens(req, rank.dp_rank), prefill)
        self.table.add_in_flight(rank.dp_rank, req)
        self.metrics.on_dispatched(rank.dp_rank)
        self.policy.on_dispatched(req, rank.dp_rank)
        await self.bus.publish(self.subjects.sched_req(rank.dp_rank), req)
        self.log.debug("dispatch rid=%s id=%d tokens=%d -> dp%d holding=%d in_flight=%d prefill=%s", req.rid,
                       req.dispatch_id, len(req.input_ids), rank.dp_rank, rank.holding_tokens, rank.in_flight_tokens,
                       "local" if req.prefill_dp_rank is None else f"dp{req.prefill_dp_rank}")

    async def on_report(self, report: LoadReport) -> None:
        problem = report_problem(report, self.args.dp_size)
        if problem is not None:
            if self.dropped_reports.should_log():
                self.log.warning("dropped nonsense load report dp_rank=%s total=%d: %s",
                                 report.dp_rank, self.dropped_reports.total, problem)
            return
        if not self.registry.admit(report.dp_rank, report.instance_id, self.clock()):
            self.note_ignored(report)
            return
        outcome = self.table.on_report(report)
        if outcome.fresh:
            self.disaggregation.on_report(report)
            await self.apply(report, outcome)

    def note_ignored(self, report: LoadReport) -> None:
        """Logs a report the registry refused: the first per (rank, instance), then every 1000th."""
        if self.ignored_reports.should_log((report.dp_rank, report.instance_id)):
            why = self.registry.refusal(report.dp_rank, report.instance_id, self.clock())
            self.log.warning("ignored load report instance=%s dp_rank=%d total=%d: %s",
                             report.instance_id, report.dp_rank, self.ignored_reports.total, why)

    async def apply(self, report: LoadReport, outcome: Outcome) -> None:
        dp_rank = report.dp_rank
        if outcome.restarted:
            self.log.warning(
                "rank restarted dp_rank=%d instance=%s redispatching=%d failing=%d",
                dp_rank, report.instance_id, len(outcome.orphans), len(outcome.lost),
            )
            self.policy.on_rank_reset(dp_rank)
            self.disaggregation.forget(dp_rank)
            await self.hand_back(dp_rank, outcome.orphans, outcome.lost, "restarted", abort=False)
        if outcome.strays:
            # It accepted requests that went elsewhere while it was dead: it must drop them.
            strays = set(outcome.strays)
            for req in self._requests_elsewhere(dp_rank, strays):
                await self.fence(req.rid, dp_rank)
        if outcome.revived:
            self.log.info("rank live dp_rank=%d instance=%s", dp_rank, report.instance_id)
            await self.flush_pending()

    def _requests_elsewhere(self, dp_rank: int, ids: set[int]) -> list[TokenizedRequest]:
        out = []
        for rank in self.table.ranks.values():
            if rank.dp_rank == dp_rank:
                continue
            out += [f.req for d, f in rank.in_flight.items() if d in ids]
            out += [r for d, r in rank.accepted.items() if d in ids]
        return out

    async def flush_pending(self) -> None:
        while self.pending and self.table.live_ranks():
            _, req = self.pending.popleft()
            await self.dispatch(req)

    async def on_query(self, _: LoadTableQuery) -> LoadTableReply:
        return LoadTableReply(method=self.args.load_balance_method, ranks=self.table.rows())

    async def on_hello(self, hello: RankHello) -> RankAssignment:
        answer = self.registry.assign(hello, self.clock())
        if answer.dp_rank is None and not self.refused_hellos.should_log((hello.requested_dp_rank, hello.instance_id)):
            return answer
        self.log.info(
            "rank hello instance=%s requested=%s -> dp_rank=%s (%s)",
            hello.instance_id, hello.requested_dp_rank, answer.dp_rank, answer.message,
        )
        return answer

    async def watch_ranks(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_interval)
            await self.expire()

    async def expire(self) -> None:
        """One watch step: ranks that went silent die; requests that waited too long for a live
        rank, or for their gateway's Resume, fail."""
        for rank in self.table.expire():
            await self.on_rank_dead(rank)
        now = self.clock()
        while self.pending and now - self.pending[0][0] > PENDING_TIMEOUT:
            _, req = self.pending.popleft()
            await self.fail(req, f"no live scheduler rank for {PENDING_TIMEOUT:.0f}s", 503)
        for req in self.migrations.expired():
            await self.fail(req, f"migration of the request timed out after {PARK_TIMEOUT:.0f}s", 503)

    async def on_rank_dead(self, rank: RankState) -> None:
        self.registry.release(rank.dp_rank)
        self.disaggregation.forget(rank.dp_rank)
        orphans, lost = rank.take_in_flight(), rank.take_accepted()
        self.log.warning(
            "rank dead dp_rank=%d redispatching=%d failing=%d", rank.dp_rank, len(orphans), len(lost)
        )
        await self.hand_back(rank.dp_rank, orphans, lost, "stopped reporting", abort=True)

    async def hand_back(
        self, dp_rank: int, orphans: list[TokenizedRequest], lost: list[TokenizedRequest], why: str, abort: bool
    ) -> None:
        """Re-dispatches what the rank never accepted and fails what it was serving.

        With `abort`, each request is also aborted on that rank alone: if the process is only
        frozen, it drops them when it resumes instead of answering twice.
        """
        for req in lost:
            message = f"DP rank {dp_rank} {why} while serving the request"
            if self.args.disable_migration or req.routed_dp_rank is not None:
                await self.fail(req, message, 503)
            else:
                await self.park(req, message)
        for req in orphans:
            if req.routed_dp_rank is not None:
                await self.fail(req, f"DP rank {dp_rank} {why} before accepting the request", 503)
            else:
                await self.dispatch(req)
        if abort:
            for req in lost + orphans:
                await self.fence(req.rid, dp_rank)

    async def fence(self, rid: str, dp_rank: int) -> None:
        """Aborts `rid` on the current instance of `dp_rank` alone (it drops the rid if it arrives
        later, too)."""
        instance_id = self.table.rank(dp_rank).instance_id
        self.fenced.setdefault(rid, set()).add((dp_rank, instance_id))
        await self.bus.publish(self.subjects.sched_control, Abort(rid=rid, dp_rank=dp_rank, instance_id=instance_id))

    async def park(self, req: TokenizedRequest, message: str) -> None:
        """Migration, step 1: tell the gateway; it answers with a Resume (`on_resume`)."""
        notice = self.migrations.park(req, message)
        self.log.warning("migrating rid=%s: %s", req.rid, message)
        await self.bus.publish(self.subjects.out(req.gateway_id), TextBatch(outputs=[notice]))

    async def on_resume(self, msg: Resume) -> ResumeReply:
        """Dispatches `msg.rid` again from its gateway's output, unless it is still running
        somewhere (Migrations.resume decides)."""
        resumed = self.migrations.resume(msg, self.table, (r for _, r in self.pending))
        if isinstance(resumed, ResumeReply):
            return resumed
        resumed.dispatch_id = next(self.dispatch_ids)
        self.log.info(
            "resume rid=%s mode=%s output_ids=%d first_seq=%d", msg.rid, msg.mode, len(msg.output_ids), msg.first_seq
        )
        await self.dispatch(resumed)
        return ResumeReply(status="dispatched")

    async def fail(self, req: TokenizedRequest, message: str, status: int) -> None:
        self.log.warning("reject rid=%s status=%d: %s", req.rid, status, message)
        await self.reply_error(req.gateway_id, req.rid, message, status)


def report_problem(r: LoadReport, dp_size: int) -> str | None:
    """What makes a LoadReport nonsense (it would corrupt the load table), or None. Schedulers
    always send an instance id (the registry keys ranks by it) and a plausible report."""
    return r.problem(dp_size) or (None if r.instance_id else "no instance_id")
