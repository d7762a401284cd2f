"""What a DP group leader owes the dispatcher about the runs it was sent.

A run is one placement of a request on this rank: (rid, first_seq) -> dispatch id. Every run
the leader receives is *accepted* in its next load report (the dispatcher stops counting it in
flight) and *finished* in the report after its final output (or at once, when refused). A rid
the dispatcher took away from this rank is *fenced*: its late arrival is dropped and its
"aborted" end here is never published, since the gateway follows the other placement now.
"""

from __future__ import annotations

from shared.bounded import BoundedSet
from shared.messages import TokenizedRequest, TokenOutput

MAX_FENCED = 4096  # rids remembered from rank-targeted aborts


class RunLedger:
    def __init__(self, max_fenced: int = MAX_FENCED) -> None:
        # rid -> {first_seq: dispatch id} of every accepted run that has not emitted its final
        # output (the engine's queues can't tell this mid-step: a prompt being prefilled is in
        # neither). One rid may have two runs here: a gateway that took its request for lost
        # submits it again at a new seq epoch, and the original may turn up after all.
        self.held: dict[str, dict[int, int]] = {}
        self.accepted: list[int] = []  # dispatch ids received since the last report
        self.finished: list[int] = []  # dispatch ids that ended since the last report
        self.fenced: BoundedSet[str] = BoundedSet(max_fenced)  # the newest rids taken away

    def holds(self, msg: TokenizedRequest) -> bool:
        """Whether this very run (rid and seq epoch) is already here."""
        return msg.first_seq in self.held.get(msg.rid, ())

    def accept(self, msg: TokenizedRequest) -> None:
        self.accepted.append(msg.dispatch_id)
        self.held.setdefault(msg.rid, {})[msg.first_seq] = msg.dispatch_id

    def refuse(self, msg: TokenizedRequest) -> None:
        """A run answered with an error at once: accepted and finished in the same report."""
        self.accepted.append(msg.dispatch_id)
        self.finished.append(msg.dispatch_id)

    def fence(self, rid: str) -> None:
        self.fenced.add(rid)

    def is_fenced(self, rid: str) -> bool:
        return rid in self.fenced

    def publishable(self, outputs: list[TokenOutput]) -> list[TokenOutput]:
        """Records the runs that `outputs` end; returns the outputs the gateways may see."""
        for out in outputs:
            if out.finish is not None and out.rid in self.held:
                self._end_run(out.rid, out.seq)
        return [o for o in outputs if not (o.rid in self.fenced and o.finish and o.finish.type == "abort")]

    def _end_run(self, rid: str, seq: int) -> None:
        """The run of `rid` whose step `seq` was its last is done. A run's seqs start at its
        first_seq, and each epoch's first_seq is above every seq of the earlier ones, so the run
        is the one with the largest first_seq <= seq."""
        runs = self.held[rid]
        first = max((f for f in runs if f <= seq), default=None)
        if first is None:
            return
        self.finished.append(runs.pop(first))
        if not runs:
            del self.held[rid]

    def take_report(self) -> tuple[list[int], list[int]]:
        """(accepted, finished) dispatch ids since the last report; the next starts empty."""
        accepted, finished = self.accepted, self.finished
        self.accepted, self.finished = [], []
        return accepted, finished
