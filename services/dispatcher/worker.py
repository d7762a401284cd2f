"""The dispatcher service: tokenized requests in, one DP rank chosen for each.

It keeps the load table from the leaders' heartbeats and the in-flight requests it sent. While no
rank is live, requests wait in a bounded queue and fail with a clear error once they waited
`PENDING_TIMEOUT` seconds; when a rank dies, its unaccepted requests go to the live ones.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque

from services.dispatcher.loads import LoadTable, RankState
from services.dispatcher.policies import make_policy
from shared.actor import Service
from shared.messages import (
    LoadReport,
    LoadTableQuery,
    LoadTableReply,
    RequestError,
    TextBatch,
    TokenizedRequest,
)

PENDING_TIMEOUT = 30.0  # seconds a request may wait for a live rank
MAX_PENDING = 4096


class DispatcherService(Service):
    name = "dispatcher"

    async def start(self) -> None:
        args = self.args
        self.table = LoadTable(dead_after=max(args.dead_rank_timeout, 3 * args.heartbeat_interval))
        self.policy = make_policy(args.load_balance_method)
        self.dispatch_ids = itertools.count(1)
        self.pending: deque[tuple[float, TokenizedRequest]] = deque()
        await self.bus.subscribe(self.subjects.dispatch, TokenizedRequest, self.on_request)
        await self.bus.subscribe(self.subjects.load_all, LoadReport, self.on_report)
        await self.bus.serve(self.subjects.dispatcher_loads, LoadTableQuery, self.on_query)
        self.spawn(self.watch_ranks())
        self.log.info("method=%s dead_after=%.2fs", args.load_balance_method, self.table.dead_after)

    async def on_request(self, req: TokenizedRequest) -> None:
        req.dispatch_id = next(self.dispatch_ids)
        await self.dispatch(req)

    async def dispatch(self, req: TokenizedRequest) -> None:
        live = self.table.live_ranks()
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
        await self.bus.publish(self.subjects.sched_req(rank.dp_rank), req)
        self.log.debug("dispatch rid=%s id=%d -> dp%d", req.rid, req.dispatch_id, rank.dp_rank)

    async def on_report(self, report: LoadReport) -> None:
        if self.table.on_report(report):
            self.log.info("rank live dp_rank=%d instance=%s", report.dp_rank, report.instance_id)
            await self.flush_pending()

    async def flush_pending(self) -> None:
        while self.pending and self.table.live_ranks():
            _, req = self.pending.popleft()
            await self.dispatch(req)

    async def on_query(self, _: LoadTableQuery) -> LoadTableReply:
        return LoadTableReply(method=self.args.load_balance_method, ranks=self.table.rows())

    async def watch_ranks(self) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat_interval)
            for rank in self.table.expire():
                await self.on_rank_dead(rank)
            await self.expire_pending()

    async def on_rank_dead(self, rank: RankState) -> None:
        orphans = sorted(rank.in_flight.values(), key=lambda f: f.req.dispatch_id)
        rank.in_flight.clear()
        self.log.warning("rank dead dp_rank=%d redispatching=%d", rank.dp_rank, len(orphans))
        for item in orphans:
            if item.req.routed_dp_rank is not None:
                await self.fail(item.req, f"DP rank {rank.dp_rank} died before accepting the request", 503)
            else:
                await self.dispatch(item.req)

    async def expire_pending(self) -> None:
        now = time.monotonic()
        while self.pending and now - self.pending[0][0] > PENDING_TIMEOUT:
            _, req = self.pending.popleft()
            await self.fail(req, f"no live scheduler rank for {PENDING_TIMEOUT:.0f}s", 503)

    async def fail(self, req: TokenizedRequest, message: str, status: int) -> None:
        self.log.warning("reject rid=%s status=%d: %s", req.rid, status, message)
        error = RequestError(rid=req.rid, message=message, status=status)
        await self.bus.publish(self.subjects.out(req.gateway_id), TextBatch(outputs=[error]))
