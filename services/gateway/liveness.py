"""Which scheduler ranks are live, as seen from the gateway: for `/health`, `internal_states`, metrics.

A dp_rank is live while its last LoadReport arrived less than `timeout` seconds ago, measured with
this process's monotonic clock on receipt (the sender's timestamp is for same-host use only).

Only plausible reports count (`accepts`, `LoadReport.problem`): dp_rank in [0, dp_size), finite
numbers, counts >= 0, kv_used <= kv_total. A rank follows one instance at a time, like the dispatcher's
registry: while that instance is live, reports of another instance for the rank are ignored (a
restarted rank is followed once its old instance has been silent for `timeout`). Accepted reports
go on to `then` (the metrics), so what the gateway shows about ranks comes only from them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from shared.messages import LoadReport


class Liveness:
    def __init__(
        self,
        timeout: float,
        dp_size: int,
        clock: Callable[[], float] = time.monotonic,
        then: Callable[[LoadReport], Awaitable[None]] | None = None,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.dp_size = dp_size
        self.then = then
        self.last_seen: dict[int, float] = {}  # dp_rank -> clock() when its last accepted report arrived
        self.instance: dict[int, str] = {}  # dp_rank -> the instance whose reports count
        self.ignored = 0  # reports not accepted

    def accepts(self, report: LoadReport) -> bool:
        if report.problem(self.dp_size) is not None:
            return False
        held_by = self.instance.get(report.dp_rank)
        return held_by in (None, report.instance_id) or not self._live(report.dp_rank)

    def feed(self, report: LoadReport) -> bool:
        """Records `report` if it is accepted; False when it is ignored."""
        if not self.accepts(report):
            self.ignored += 1
            return False
        self.last_seen[report.dp_rank] = self.clock()
        self.instance[report.dp_rank] = report.instance_id
        return True

    async def on_report(self, report: LoadReport) -> None:
        """Bus handler for `subjects.load_all`."""
        if self.feed(report) and self.then is not None:
            await self.then(report)

    def live_ranks(self) -> list[int]:
        return sorted(r for r in self.last_seen if self._live(r))

    def _live(self, dp_rank: int) -> bool:
        seen = self.last_seen.get(dp_rank)
        return seen is not None and self.clock() - seen < self.timeout
