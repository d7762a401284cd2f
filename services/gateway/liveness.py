"""Which scheduler ranks are live, as seen from the gateway: for `/health`.

A dp_rank is live while its last LoadReport arrived less than `timeout` seconds ago, measured with
this process's monotonic clock on receipt (the sender's timestamp is for same-host use only).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.messages import LoadReport


class Liveness:
    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self.last_seen: dict[int, float] = {}  # dp_rank -> clock() when its last report arrived

    def feed(self, report: LoadReport) -> None:
        self.last_seen[report.dp_rank] = self.clock()

    async def on_report(self, report: LoadReport) -> None:
        """Bus handler for `subjects.load_all`."""
        self.feed(report)

    def live_ranks(self) -> list[int]:
        now = self.clock()
        return sorted(r for r, t in self.last_seen.items() if now - t < self.timeout)
