"""The dispatcher service: tokenized requests in, one DP rank chosen for each.

It keeps the load table from the leaders' heartbeats and the requests it sent, and the rank
registry. While no rank is live, requests wait in a bounded queue and fail with a clear error once
they waited `PENDING_TIMEOUT` seconds. When a rank dies (or restarts as a new instance), its
unaccepted requests go to the live ranks, its accepted ones migrate (parked until their gateway
answers with a Resume carrying the output it holds; `--disable-migration`: a 503 error), and every one of
them is aborted on that rank alone, so a frozen process that resumes does not serve them twice.
A LoadReport reaches the load table only if the rank registry admits it (registry.py): one from an
instance other than the live holder of its rank is ignored, so a bus client cannot take a rank over.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque

import msgspec

from services.dispatcher.loads import LoadTable, Outcome, RankState
from services.dispatcher.metrics import DispatcherMetrics
from services.dispatcher.policies import PolicyConfig, make_policy
from services.dispatcher.registry import RankRegistry
from shared.actor import Service
from shared.messages import (
    Abort,
    LoadReport,
    LoadTableQuery,
    LoadTableReply,
    RankAssignment,
    RankHello,
    RequestError,
    Resume,
    ResumeReply,
    TextBatch,
    TokenizedRequest,
)
from shared.metrics import publish_snapshots

PENDING_TIMEOUT = 30.0  # seconds a request may wait for a live rank
MAX_PENDING = 4096
REGISTRATION_GRACE = 10.0  # seconds an assigned rank may stay silent before it is free again
MAX_FENCED = 8192
MAX_LOGGED_KEYS = 1024  # LogOnce: keys remembered (the oldest forgotten first)
PARK_TIMEOUT = 30.0  # seconds a migrating request waits for its gateway's Resume
FINAL_GRACE = 1.0  # seconds after a rank reported a request finished before a Resume may rerun it


class LogOnce:
    """Counts repeated events and says which to log: the first of each key, then every 1000th."""

    def __init__(self) -> None:
        self.total = 0
        self._seen: dict[object, None] = {}  # insertion-ordered set, at most MAX_LOGGED_KEYS

    def should_log(self, key: object) -> bool:
        self.total += 1
        if key in self._seen:
            return self.total % 1000 == 0
        self._seen[key] = None
        while len(self._seen) > MAX_LOGGED_KEYS:
            del self._seen[next(iter(self._seen))]
        return True


class DispatcherService(Service):
    name = "dispatcher"

    async def start(self) -> None:
        args = self.args
        dead_after = max(args.dead_rank_timeout, 3 * args.heartbeat_interval)
        self.table = LoadTable(dead_after=dead_after)
        self.registry = RankRegistry(args.dp_size, grace=max(REGISTRATION_GRACE, dead_after), dead_after=dead_after)
        config = PolicyConfig(
            cache_threshold=args.cache_threshold,
            balance_abs_threshold=args.balance_abs_threshold,
            balance_rel_threshold=args.balance_rel_threshold,
            max_tree_size=args.max_tree_size,
        )
        self.policy = make_policy(args.load_balance_method, config=config)
        self.dispatch_ids = itertools.count(1)
        self.pending: deque[tuple[float, TokenizedRequest]] = deque()
        self.dropped_reports = 0  # LoadReports with nonsense fields (report_problem)
        self.ignored_reports = LogOnce()  # well-formed LoadReports of an instance that does not hold the rank
        self.refused_hellos = LogOnce()  # RankHellos answered without a rank (a scheduler asks every second)
        # rid -> (parked at, request): its rank died while serving it; its gateway was told
        # (RequestError.migrate) and answers with a Resume carrying the output it already has
        self.parked: dict[str, tuple[float, TokenizedRequest]] = {}
        # rid -> (dp_rank, instance) told to drop it (rank-targeted Abort): that instance would drop
        # it again, so a migrated or re-run request goes elsewhere; a restarted instance of the
        # same rank never saw the abort and may take it (bounded, oldest forgotten first)
        self.fenced: dict[str, set[tuple[int, str]]] = {}
        await self.bus.subscribe(self.subjects.dispatch, TokenizedRequest, self.on_request)
        await self.bus.subscribe(self.subjects.load_all, LoadReport, self.on_report)
        await self.bus.serve(self.subjects.dispatcher_loads, LoadTableQuery, self.on_query)
        await self.bus.serve(self.subjects.rank_register, RankHello, self.on_hello)
        await self.bus.serve(self.subjects.dispatcher_resume, Resume, self.on_resume)
        self.spawn(self.watch_ranks())
        self.metrics = DispatcherMetrics(args.load_balance_method)
        collect = self.metrics.collector(self.table.rows, lambda: len(self.pending))
        self.spawn(publish_snapshots(self.bus, self.subjects.metrics, "dispatcher", uuid.uuid4().hex, collect))
        self.log.info("method=%s dead_after=%.2fs", args.load_balance_method, dead_after)

    async def on_request(self, req: TokenizedRequest) -> None:
        req.dispatch_id = next(self.dispatch_ids)
        await self.dispatch(req)

    async def dispatch(self, req: TokenizedRequest) -> None:
        live = self.table.live_ranks()
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
                self.pending.append((time.monotonic(), req))
            return
        else:
            rank = self.policy.pick(req, live)
        self.table.add_in_flight(rank.dp_rank, req)
        self.metrics.on_dispatched(rank.dp_rank)
        self.policy.on_dispatched(req, rank.dp_rank)
        await self.bus.publish(self.subjects.sched_req(rank.dp_rank), req)
        self.log.debug("dispatch rid=%s id=%d -> dp%d", req.rid, req.dispatch_id, rank.dp_rank)

    async def on_report(self, report: LoadReport) -> None:
        problem = report_problem(report, self.args.dp_size)
        if problem is not None:
            self.dropped_reports += 1
            if self.dropped_reports <= 20 or self.dropped_reports % 1000 == 0:
                self.log.warning("dropped nonsense load report dp_rank=%s total=%d: %s",
                                 report.dp_rank, self.dropped_reports, problem)
            return
        if not self.registry.admit(report.dp_rank, report.instance_id, time.monotonic()):
            self.note_ignored(report)
            return
        outcome = self.table.on_report(report)
        if outcome.fresh:
            await self.apply(report, outcome)

    def note_ignored(self, report: LoadReport) -> None:
        """Logs a report the registry refused: once per (rank, instance), then every 1000th."""
        if self.ignored_reports.should_log((report.dp_rank, report.instance_id)):
            why = self.registry.refusal(report.dp_rank, report.instance_id, time.monotonic())
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
        answer = self.registry.assign(hello, time.monotonic())
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
            for rank in self.table.expire():
                await self.on_rank_dead(rank)
            await self.expire_pending()
            await self.expire_parked()

    async def on_rank_dead(self, rank: RankState) -> None:
        self.registry.release(rank.dp_rank)
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
        while len(self.fenced) > MAX_FENCED:
            del self.fenced[next(iter(self.fenced))]
        await self.bus.publish(self.subjects.sched_control, Abort(rid=rid, dp_rank=dp_rank, instance_id=instance_id))

    async def park(self, req: TokenizedRequest, message: str) -> None:
        """Migration, step 1: tell the gateway; it answers with a Resume (`on_resume`)."""
        self.parked[req.rid] = (time.monotonic(), req)
        self.log.warning("migrating rid=%s: %s", req.rid, message)
        notice = RequestError(rid=req.rid, message=message + "; migrating", status=503, migrate=True)
        await self.bus.publish(self.subjects.out(req.gateway_id), TextBatch(outputs=[notice]))

    async def on_resume(self, msg: Resume) -> ResumeReply:
        """Continues `msg.rid` from the gateway's output, unless it is still running somewhere.

        Re-dispatched: a parked request (its rank died), or one that finished more than
        FINAL_GRACE s ago whose final output never reached the gateway. The new dispatch carries
        the gateway's output ids as `resume_output_ids` and `first_seq`, a new seq epoch, so any
        late output of the earlier run sorts below it and is ignored.
        """
        parked = self.parked.pop(msg.rid, None)
        if parked is not None:
            req = parked[1]
        else:
            where = self.table.locate(msg.rid)
            if where is not None:
                return ResumeReply(status="running", dp_rank=where[0].dp_rank)
            if any(r.rid == msg.rid for _, r in self.pending):
                return ResumeReply(status="running", message="waiting for a live rank")
            done = self.table.finished.get(msg.rid)
            if done is None:
                return ResumeReply(status="unknown", message="the dispatcher does not know this request")
            if time.monotonic() - done[1] < FINAL_GRACE:
                return ResumeReply(status="running", message="just finished")
            self.table.finished.pop(msg.rid)
            req = done[0]
        if req.gateway_id != msg.gateway_id:
            return ResumeReply(status="unknown", message="the request belongs to another gateway")
        resumed = msgspec.structs.replace(
            req,
            resume_output_ids=list(msg.output_ids),
            first_seq=msg.first_seq,
            dispatch_id=next(self.dispatch_ids),
        )
        self.log.info(
            "resume rid=%s mode=%s output_ids=%d first_seq=%d", msg.rid, msg.mode, len(msg.output_ids), msg.first_seq
        )
        await self.dispatch(resumed)
        return ResumeReply(status="dispatched")

    async def expire_parked(self) -> None:
        now = time.monotonic()
        for rid, (at, req) in list(self.parked.items()):
            if now - at > PARK_TIMEOUT:
                del self.parked[rid]
                await self.fail(req, f"migration of the request timed out after {PARK_TIMEOUT:.0f}s", 503)

    async def expire_pending(self) -> None:
        now = time.monotonic()
        while self.pending and now - self.pending[0][0] > PENDING_TIMEOUT:
            _, req = self.pending.popleft()
            await self.fail(req, f"no live scheduler rank for {PENDING_TIMEOUT:.0f}s", 503)

    async def fail(self, req: TokenizedRequest, message: str, status: int) -> None:
        self.log.warning("reject rid=%s status=%d: %s", req.rid, status, message)
        error = RequestError(rid=req.rid, message=message, status=status)
        await self.bus.publish(self.subjects.out(req.gateway_id), TextBatch(outputs=[error]))


def report_problem(r: LoadReport, dp_size: int) -> str | None:
    """What makes a LoadReport nonsense (it would corrupt the load table), or None. Schedulers
    always send an instance id (the registry keys ranks by it) and a plausible report."""
    return r.problem(dp_size) or (None if r.instance_id else "no instance_id")
