"""The rank registry: which scheduler instance serves which dp_rank (Ray Serve's rank assigner idea).

A scheduler that starts without `--dp-rank` asks for one (RankHello -> RankAssignment) and gets the
first free rank below `dp_size`; one that has a rank (launcher, container env) confirms it, and its
reports claim the rank too. A rank is free when nobody holds it, when its holder died (the
dispatcher calls `release`), or when an assignment got no report within `grace` seconds.

Invariants:
- each rank has at most one owner instance;
- an instance that lost its rank to another instance is retired for that rank: its reports are
  ignored (a frozen process that resumes must not steal the rank back).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.messages import RankAssignment, RankHello


@dataclass
class Owner:
    instance_id: str
    since: float
    reported: bool  # a report arrived from it since the assignment


class RankRegistry:
    def __init__(self, dp_size: int, grace: float) -> None:
        self.dp_size = dp_size
        self.grace = grace
        self.owners: dict[int, Owner] = {}
        self.last_owner: dict[int, str] = {}  # dp_rank -> the instance that held it last
        self.retired: set[tuple[int, str]] = set()

    def assign(self, hello: RankHello, now: float) -> RankAssignment:
        for rank, owner in self.owners.items():
            if owner.instance_id == hello.instance_id and hello.requested_dp_rank in (None, rank):
                return RankAssignment(dp_rank=rank, message="already assigned")
        wanted = hello.requested_dp_rank
        if wanted is not None:
            if wanted < 0:
                return RankAssignment(dp_rank=None, message=f"requested dp_rank {wanted} is negative")
            self._take(wanted, hello.instance_id, now)
            return RankAssignment(dp_rank=wanted, message="confirmed")
        for rank in range(self.dp_size):
            if self._free(rank, now):
                self._take(rank, hello.instance_id, now)
                return RankAssignment(dp_rank=rank, message="assigned")
        return RankAssignment(
            dp_rank=None, message=f"all {self.dp_size} DP ranks are taken; ask again when one is released"
        )

    def admit(self, dp_rank: int, instance_id: str, now: float) -> bool:
        """A report from `instance_id` for `dp_rank`: False if that instance was retired from it."""
        if (dp_rank, instance_id) in self.retired:
            return False
        owner = self.owners.get(dp_rank)
        if owner is None or owner.instance_id != instance_id:
            self._take(dp_rank, instance_id, now)  # a restart, or a rank resuming after release
            owner = self.owners[dp_rank]
        owner.reported = True
        return True

    def release(self, dp_rank: int) -> None:
        self.owners.pop(dp_rank, None)

    def _free(self, rank: int, now: float) -> bool:
        owner = self.owners.get(rank)
        return owner is None or (not owner.reported and now - owner.since > self.grace)

    def _take(self, rank: int, instance_id: str, now: float) -> None:
        previous = self.last_owner.get(rank)
        if previous is not None and previous != instance_id:
            self.retired.add((rank, previous))
        self.retired.discard((rank, instance_id))
        self.owners[rank] = Owner(instance_id, now, reported=False)
        self.last_owner[rank] = instance_id
