"""The dispatcher's metric samples, published as MetricsSnapshots (shared/metrics.py).

Decisions are counted per (dp_rank, method) as requests are sent; everything else is read from the
load table at snapshot time: in-flight requests and tokens, report age, live / dead ranks, and the
requests waiting for a live rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from shared.messages import RankLoad
from shared.metrics import Sample


class DispatcherMetrics:
    def __init__(self, method: str) -> None:
        self.method = method
        self.decisions: Counter[int] = Counter()  # dp_rank -> requests sent to it

    def on_dispatched(self, dp_rank: int) -> None:
        self.decisions[dp_rank] += 1

    def samples(self, rows: list[RankLoad], pending: int) -> list[Sample]:
        out = [
            Sample("dpserve:dispatcher_decisions_total", n, {"dp_rank": str(r), "method": self.method})
            for r, n in sorted(self.decisions.items())
        ]
        for row in rows:
            rank = {"dp_rank": str(row.dp_rank)}
            out += [
                Sample("dpserve:dispatcher_in_flight_requests", row.in_flight_requests, rank),
                Sample("dpserve:dispatcher_in_flight_tokens", row.in_flight_tokens, rank),
                Sample("dpserve:dispatcher_report_age_seconds", row.report_age_s, rank),
                Sample("dpserve:dispatcher_rank_live", 1 if row.status == "live" else 0, rank),
            ]
        out.append(Sample("dpserve:dispatcher_dead_ranks", sum(row.status != "live" for row in rows)))
        out.append(Sample("dpserve:dispatcher_pending_requests", pending))
        return out

    def collector(self, rows: Callable[[], list[RankLoad]], pending: Callable[[], int]) -> Callable[[], list[Sample]]:
        return lambda: self.samples(rows(), pending())
