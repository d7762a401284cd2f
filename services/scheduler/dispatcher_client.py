"""What a DP group leader says to the dispatcher: its load, and which dp_rank it serves.

Load reports (DESIGN.md, "Load balancing") go out after every step that changed the load, at
most every MIN_REPORT_GAP s, and at least every --heartbeat-interval (`heartbeat`). The rank
registry assigns a dp_rank to a leader started without one, or confirms the one it was given,
so that no other instance takes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.scheduler.engine import Engine
from services.scheduler.inbox import Inbox
from shared.bus import Bus
from shared.messages import LoadReport, RankAssignment, RankHello
from shared.subjects import Subjects

MIN_REPORT_GAP = 0.01
REGISTER_RETRY_S = 1.0  # between rank-registry requests while no rank is assigned


class DispatcherClient:
    def __init__(
        self,
        bus: Bus,
        subjects: Subjects,
        instance_id: str,
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
        node_rank: int = 0,
    ) -> None:
        self.bus = bus
        self.node_rank = node_rank  # reported, so /get_server_info shows where each rank runs
        self.subjects = subjects
        self.instance_id = instance_id
        self.log = log
        self.clock = clock
        self.report_seq = 0
        self.last_report = 0.0  # clock() of the last report

    def since_report(self) -> float:
        return self.clock() - self.last_report

    async def report(
        self, dp_rank: int, engine: Engine, inbox: Inbox, accepted: list[int], finished: list[int],
        mode: str = "null", bootstrap_addr: str = "", tasks_accepted: list[int] | None = None,
    ) -> None:
        """The load of the engine plus what waits in the inbox; the runs accepted and finished
        since the last report (a prefill rank: the tasks it took, and where decode ranks reach it)."""
        self.report_seq += 1
        self.last_report = self.clock()
        await self.bus.publish(
            self.subjects.load(dp_rank),
            LoadReport(
                dp_rank=dp_rank,
                seq=self.report_seq,
                timestamp=self.last_report,
                holding_tokens=engine.holding_tokens + inbox.holding_tokens,
                num_running=len(engine.running),
                num_waiting=len(engine.waiting) + len(inbox.reqs),
                kv_used=engine.kv_used,
                kv_total=engine.pool.size,
                cache_hit_rate=engine.cache.hit_rate,
                accepted=accepted,
                instance_id=self.instance_id,
                finished=finished,
                node_rank=self.node_rank,
                mode=mode,
                bootstrap_addr=bootstrap_addr,
                tasks_accepted=tasks_accepted or [],
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
