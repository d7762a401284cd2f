"""The rank registry: which scheduler instance serves which dp_rank (Ray Serve's rank assigner idea).

It is the authority on who holds a rank; the load table only follows it. A scheduler that starts
without `--dp-rank` asks for one (RankHello -> RankAssignment) and gets the first free rank below
`dp_size`; one that has a rank (launcher, container env) asks to confirm it.

A rank is *free* when nobody holds it, when its holder stopped reporting for `dead_after` seconds
(or the dispatcher saw it die and called `release`), or when an assignment got no report within
`grace` seconds. A rank that is not free is *held*:
- a RankHello for a held rank from another instance is refused (RankAssignment with dp_rank None);
  the scheduler asks again until the holder is dead;
- a LoadReport for a held rank from another instance is ignored (`admit` is False): a bus client
  cannot take a live rank over by publishing a well-formed report with a new instance id.
A report for a *free* rank claims it, exactly as a hello would: that is how a frozen rank that
resumes gets its rank back, and how a restarted dispatcher (an empty registry) adopts the
schedulers that are already running and will not say hello again. So a report never gets more
than a hello would.

Invariants:
- each rank has at most one owner instance, and only `dp_rank` in [0, dp_size) is ever owned;
- an owner that reported within `dead_after` seconds keeps its rank against every other instance;
- an instance that lost its rank to another instance is retired for that rank: its reports are
  ignored (a frozen process that resumes must not steal the rank back).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.bounded import BoundedSet
from shared.messages import RankAssignment, RankHello

MAX_RETIRED = 4096  # (rank, instance) pairs remembered; the oldest are forgotten first


@dataclass
class Owner:
    instance_id: str
    since: float  # when the rank was assigned to it
    reported: bool = False  # a report arrived from it since the assignment
    last_seen: float = 0.0  # when its last report arrived (valid once `reported`)


class RankRegistry:
    """Time comes in as `now` on every call (the dispatcher passes its clock's reading)."""

    def __init__(self, dp_size: int, grace: float, dead_after: float | None = None) -> None:
        self.dp_size = dp_size
        self.grace = grace  # seconds an assignment may stay silent before the rank is free again
        self.dead_after = grace if dead_after is None else dead_after  # silence that frees a reporting owner
        self.owners: dict[int, Owner] = {}
        self.last_owner: dict[int, str] = {}  # dp_rank -> the instance that held it last
        self.retired: BoundedSet[tuple[int, str]] = BoundedSet(MAX_RETIRED)  # (dp_rank, replaced instance)

    def assign(self, hello: RankHello, now: float) -> RankAssignment:
        if not hello.instance_id:
            return RankAssignment(dp_rank=None, message="a RankHello needs an instance_id")
        wanted = hello.requested_dp_rank
        for rank, owner in self.owners.items():
            if owner.instance_id == hello.instance_id and wanted in (None, rank):
                return RankAssignment(dp_rank=rank, message="already assigned")
        if wanted is not None:
            if not 0 <= wanted < self.dp_size:
                return RankAssignment(dp_rank=None, message=f"requested dp_rank {wanted} is outside [0, {self.dp_size})")
            if not self.free(wanted, now):
                return RankAssignment(
                    dp_rank=None,
                    message=f"dp_rank {wanted} is held by live instance {self.owners[wanted].instance_id}; "
                    f"ask again after it stops reporting for {self.dead_after:g}s",
                )
            self._take(wanted, hello.instance_id, now)
            return RankAssignment(dp_rank=wanted, message="confirmed")
        for rank in range(self.dp_size):
            if self.free(rank, now):
                self._take(rank, hello.instance_id, now)
                return RankAssignment(dp_rank=rank, message="assigned")
        return RankAssignment(
            dp_rank=None, message=f"all {self.dp_size} DP ranks are taken; ask again when one is released"
        )

    def admit(self, dp_rank: int, instance_id: str, now: float) -> bool:
        """A report from `instance_id` for `dp_rank`: True if it counts. False when the instance was
        retired from the rank, or another instance holds the rank (`refusal` says which)."""
        return self.refusal(dp_rank, instance_id, now) is None and self._seen(dp_rank, instance_id, now)

    def refusal(self, dp_rank: int, instance_id: str, now: float) -> str | None:
        """Why a report from `instance_id` for `dp_rank` would not count, or None."""
        if not 0 <= dp_rank < self.dp_size:
            return f"dp_rank outside [0, {self.dp_size})"
        if (dp_rank, instance_id) in self.retired:
            return "the instance was replaced on this rank"
        owner = self.owners.get(dp_rank)
        if owner is not None and owner.instance_id != instance_id and not self.free(dp_rank, now):
            return f"the rank is held by instance {owner.instance_id}"
        return None

    def holder(self, dp_rank: int) -> str | None:
        owner = self.owners.get(dp_rank)
        return owner.instance_id if owner else None

    def release(self, dp_rank: int) -> None:
        """The holder died (the load table expired it): the rank is free."""
        self.owners.pop(dp_rank, None)

    def free(self, rank: int, now: float) -> bool:
        owner = self.owners.get(rank)
        if owner is None:
            return True
        if owner.reported:
            return now - owner.last_seen > self.dead_after
        return now - owner.since > self.grace

    def _seen(self, dp_rank: int, instance_id: str, now: float) -> bool:
        owner = self.owners.get(dp_rank)
        if owner is None or owner.instance_id != instance_id:
            self._take(dp_rank, instance_id, now)  # a free rank: resuming after release, or adopted
            owner = self.owners[dp_rank]
        owner.reported = True
        owner.last_seen = now
        return True

    def _take(self, rank: int, instance_id: str, now: float) -> None:
        previous = self.last_owner.get(rank)
        if previous is not None and previous != instance_id:
            self.retired.add((rank, previous))
        self.retired.pop((rank, instance_id), None)
        self.owners[rank] = Owner(instance_id, now)
        self.last_owner[rank] = instance_id
