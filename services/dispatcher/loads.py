"""The load table: what each DP rank reported, plus what was sent to it and not yet accepted.

A request is in flight from the moment it is dispatched until a LoadReport of its rank lists its
dispatch id. Its tokens count toward that rank's load until then, so a burst that arrives between
two reports spreads over the ranks instead of piling onto the one that looked lightest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from shared.messages import LoadReport, RankLoad, TokenizedRequest


@dataclass
class InFlight:
    req: TokenizedRequest
    sent_at: float

    @property
    def tokens(self) -> int:
        return len(self.req.input_ids)


@dataclass
class RankState:
    dp_rank: int
    report: LoadReport | None = None
    received_at: float = 0.0  # monotonic time of the last report's arrival
    live: bool = False
    in_flight: dict[int, InFlight] = field(default_factory=dict)  # dispatch id -> request

    @property
    def holding_tokens(self) -> int:
        return self.report.holding_tokens if self.report else 0

    @property
    def in_flight_tokens(self) -> int:
        return sum(f.tokens for f in self.in_flight.values())

    @property
    def num_requests(self) -> int:
        r = self.report
        return (r.num_running + r.num_waiting if r else 0) + len(self.in_flight)


class LoadTable:
    def __init__(self, dead_after: float) -> None:
        self.dead_after = dead_after
        self.ranks: dict[int, RankState] = {}

    def rank(self, dp_rank: int) -> RankState:
        if dp_rank not in self.ranks:
            self.ranks[dp_rank] = RankState(dp_rank)
        return self.ranks[dp_rank]

    def live_ranks(self) -> list[RankState]:
        return [r for _, r in sorted(self.ranks.items()) if r.live]

    def on_report(self, report: LoadReport, now: float | None = None) -> bool:
        """Records a report; returns True when the rank came (back) to life."""
        rank = self.rank(report.dp_rank)
        if rank.report is not None and report.instance_id == rank.report.instance_id and report.seq <= rank.report.seq:
            return False  # stale or duplicate
        rank.report = report
        rank.received_at = time.monotonic() if now is None else now
        for dispatch_id in report.accepted:
            rank.in_flight.pop(dispatch_id, None)
        revived = not rank.live
        rank.live = True
        return revived

    def add_in_flight(self, dp_rank: int, req: TokenizedRequest, now: float | None = None) -> None:
        self.rank(dp_rank).in_flight[req.dispatch_id] = InFlight(req, time.monotonic() if now is None else now)

    def expire(self, now: float | None = None) -> list[RankState]:
        """Marks ranks without a recent report dead; returns the ones that just died."""
        now = time.monotonic() if now is None else now
        died = []
        for rank in self.ranks.values():
            if rank.live and now - rank.received_at > self.dead_after:
                rank.live = False
                died.append(rank)
        return died

    def rows(self, now: float | None = None) -> list[RankLoad]:
        now = time.monotonic() if now is None else now
        out = []
        for _, r in sorted(self.ranks.items()):
            rep = r.report
            out.append(
                RankLoad(
                    dp_rank=r.dp_rank,
                    status="live" if r.live else "dead",
                    holding_tokens=r.holding_tokens,
                    in_flight_requests=len(r.in_flight),
                    in_flight_tokens=r.in_flight_tokens,
                    num_running=rep.num_running if rep else 0,
                    num_waiting=rep.num_waiting if rep else 0,
                    kv_used=rep.kv_used if rep else 0,
                    kv_total=rep.kv_total if rep else 0,
                    report_age_s=round(now - r.received_at, 3) if rep else -1.0,
                )
            )
        return out
