"""The load table: what each DP rank reported, plus what was sent to it and not yet accepted.

A request is in flight from the moment it is dispatched until a LoadReport of its rank lists its
dispatch id in `accepted`; then it is accepted until a report lists it in `finished`. In-flight
tokens count toward the rank's load, so a burst that arrives between two reports spreads over the
ranks instead of piling onto the one that looked lightest.

Invariants:
- a dispatch id is in at most one rank's `in_flight` and, once accepted, in that rank's `accepted`;
- a rank's in-flight and accepted entries all belong to the instance in `instance_id`: a report
  from a new instance (restart) hands the old instance's entries back to the caller (`Outcome`);
  the caller feeds only reports its rank registry admitted (a new instance only once the rank is free);
- a rank is live while its last report is at most `dead_after` seconds old.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.bounded import BoundedDict
from shared.messages import LoadReport, RankLoad, TokenizedRequest


@dataclass
class InFlight:
    req: TokenizedRequest
    sent_at: float

    @property
    def tokens(self) -> int:
        return len(self.req.input_ids)


MAX_RECENTLY_FINISHED = 8192  # rids kept in LoadTable.finished, the oldest forgotten first


@dataclass
class RankState:
    dp_rank: int
    report: LoadReport | None = None
    received_at: float = 0.0  # clock() at the last report's arrival
    live: bool = False
    instance_id: str = ""
    in_flight: dict[int, InFlight] = field(default_factory=dict)  # dispatch id -> request
    in_flight_tokens: int = 0  # sum of in_flight[*].tokens, kept incrementally
    accepted: dict[int, TokenizedRequest] = field(default_factory=dict)  # dispatch id -> request

    @property
    def holding_tokens(self) -> int:
        return self.report.holding_tokens if self.report else 0

    @property
    def mode(self) -> str:
        """Its --disaggregation-mode, as it reports it ("null" until a report says)."""
        return self.report.mode if self.report else "null"

    @property
    def num_requests(self) -> int:
        r = self.report
        return (r.num_running + r.num_waiting if r else 0) + len(self.in_flight)

    def take_in_flight(self) -> list[TokenizedRequest]:
        """Empties the in-flight set; its requests in dispatch order."""
        out = [f.req for _, f in sorted(self.in_flight.items())]
        self.in_flight.clear()
        self.in_flight_tokens = 0
        return out

    def take_accepted(self) -> list[TokenizedRequest]:
        out = [r for _, r in sorted(self.accepted.items())]
        self.accepted.clear()
        return out


@dataclass
class Outcome:
    """What a report changed beyond the numbers, for the dispatcher to act on."""

    fresh: bool = False  # False: a stale or duplicate report, ignored
    revived: bool = False  # the rank was dead (or unknown) and is live now
    restarted: bool = False  # a new instance took the rank over
    orphans: list[TokenizedRequest] = field(default_factory=list)  # old instance's in-flight: dispatch again
    lost: list[TokenizedRequest] = field(default_factory=list)  # old instance's accepted: fail them
    strays: list[int] = field(default_factory=list)  # accepted ids the table no longer expects here


class LoadTable:
    """`now` arguments override the clock (a simulation drives its own time); by default every
    timestamp comes from `clock`."""

    def __init__(self, dead_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.dead_after = dead_after
        self.clock = clock
        self.ranks: dict[int, RankState] = {}
        self._live: list[RankState] | None = None  # cache of live_ranks(); None after a change
        # rid -> (request, when it finished) for the last requests that ended on a rank: if the
        # gateway never got the final output (a detokenizer died with it), it can run again
        self.finished: BoundedDict[str, tuple[TokenizedRequest, float]] = BoundedDict(MAX_RECENTLY_FINISHED)

    def rank(self, dp_rank: int) -> RankState:
        if dp_rank not in self.ranks:
            self.ranks[dp_rank] = RankState(dp_rank)
            self._live = None
        return self.ranks[dp_rank]

    def live_ranks(self) -> list[RankState]:
        """Live ranks by dp_rank; the same list object until a rank's liveness changes."""
        if self._live is None:
            self._live = [r for _, r in sorted(self.ranks.items()) if r.live]
        return self._live

    def on_report(self, report: LoadReport, now: float | None = None) -> Outcome:
        rank = self.rank(report.dp_rank)
        out = Outcome(fresh=True)
        if rank.report is not None and report.instance_id == rank.instance_id and report.seq <= rank.report.seq:
            return Outcome()  # stale or duplicate
        if rank.instance_id and report.instance_id != rank.instance_id:
            out.restarted = True
            # What the new instance accepted was sent to the rank's subject after it subscribed;
            # everything else in flight went to the old process and is gone with it.
            kept = {d: rank.in_flight.pop(d) for d in report.accepted if d in rank.in_flight}
            out.orphans = rank.take_in_flight()
            out.lost = rank.take_accepted()
            rank.in_flight = kept
            rank.in_flight_tokens = sum(f.tokens for f in kept.values())
        rank.instance_id = report.instance_id
        rank.report = report
        rank.received_at = self.clock() if now is None else now
        for dispatch_id in report.accepted:
            item = rank.in_flight.pop(dispatch_id, None)
            if item is None:
                out.strays.append(dispatch_id)  # re-dispatched elsewhere while the rank was dead
                continue
            rank.in_flight_tokens -= item.tokens
            rank.accepted[dispatch_id] = item.req
        for dispatch_id in report.finished:
            done = rank.accepted.pop(dispatch_id, None)
            if done is not None:
                self.finished[done.rid] = (done, rank.received_at)
        out.revived = not rank.live
        if out.revived:
            rank.live = True
            self._live = None
        return out

    def locate(self, rid: str) -> tuple[RankState, int, bool] | None:
        """Where `rid` is now: (rank, dispatch id, accepted?), or None. A linear scan: recovery only."""
        for rank in self.ranks.values():
            for dispatch_id, item in rank.in_flight.items():
                if item.req.rid == rid:
                    return rank, dispatch_id, False
            for dispatch_id, req in rank.accepted.items():
                if req.rid == rid:
                    return rank, dispatch_id, True
        return None

    def add_in_flight(self, dp_rank: int, req: TokenizedRequest, now: float | None = None) -> None:
        rank = self.rank(dp_rank)
        item = InFlight(req, self.clock() if now is None else now)
        old = rank.in_flight.get(req.dispatch_id)
        rank.in_flight[req.dispatch_id] = item
        rank.in_flight_tokens += item.tokens - (old.tokens if old else 0)

    def expire(self, now: float | None = None) -> list[RankState]:
        """Marks ranks without a recent report dead; returns the ones that just died."""
        now = self.clock() if now is None else now
        died = []
        for rank in self.ranks.values():
            if rank.live and now - rank.received_at > self.dead_after:
                rank.live = False
                self._live = None
                died.append(rank)
        return died

    def rows(self, now: float | None = None) -> list[RankLoad]:
        now = self.clock() if now is None else now
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
                    accepted_requests=len(r.accepted),
                    cache_hit_rate=rep.cache_hit_rate if rep else 0.0,
                    instance_id=r.instance_id,
                )
            )
        return out
