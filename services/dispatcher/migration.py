"""Migration: a request whose DP rank died while serving it continues on another rank.

1. `park`: the dispatcher holds the request and tells its gateway (RequestError with `migrate`);
2. the gateway answers with a Resume that carries the output it already holds;
3. `resume`: the request goes out again with that output as `resume_output_ids` and `first_seq`,
   a new seq epoch, so any late output of the earlier run sorts below it and is ignored.

A Resume also re-runs a request that finished more than FINAL_GRACE seconds ago whose final output
never reached its gateway (a detokenizer died with it). A parked request whose gateway does not
answer within PARK_TIMEOUT seconds fails (`expired`).

A parked request is in no rank's in-flight or accepted set: the load table handed it back before
it was parked. This module decides; the dispatcher service does the publishing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec

from services.dispatcher.loads import LoadTable
from shared.messages import RequestError, Resume, ResumeReply, TokenizedRequest

PARK_TIMEOUT = 30.0  # seconds a migrating request waits for its gateway's Resume
FINAL_GRACE = 1.0  # seconds after a rank reported a request finished before a Resume may rerun it
OTHER_GATEWAY = ResumeReply(status="unknown", message="the request belongs to another gateway")


class Migrations:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # rid -> (clock() when parked, request): its rank died while serving it; its gateway was
        # told and answers with a Resume
        self.parked: dict[str, tuple[float, TokenizedRequest]] = {}

    def park(self, req: TokenizedRequest, message: str) -> RequestError:
        """Holds `req` until its gateway's Resume; returns the notice to send that gateway."""
        self.parked[req.rid] = (self.clock(), req)
        return RequestError(rid=req.rid, message=message + "; migrating", status=503, migrate=True)

    def resume(
        self, msg: Resume, table: LoadTable, pending: Iterable[TokenizedRequest]
    ) -> TokenizedRequest | ResumeReply:
        """The request to dispatch again for `msg`, carrying the gateway's output (its dispatch id
        is the caller's to set), or the reply that says why not: it is still running, waiting in
        `pending`, or unknown here."""
        parked = self.parked.get(msg.rid)
        if parked is not None:
            req = parked[1]
            if req.gateway_id != msg.gateway_id:  # checked before it is taken: a stray Resume drops nothing
                return OTHER_GATEWAY
            del self.parked[msg.rid]
        else:
            where = table.locate(msg.rid)
            if where is not None:
                return ResumeReply(status="running", dp_rank=where[0].dp_rank)
            if any(r.rid == msg.rid for r in pending):
                return ResumeReply(status="running", message="waiting for a live rank")
            done = table.finished.get(msg.rid)
            if done is None:
                return ResumeReply(status="unknown", message="the dispatcher does not know this request")
            req = done[0]
            if req.gateway_id != msg.gateway_id:
                return OTHER_GATEWAY
            if self.clock() - done[1] < FINAL_GRACE:
                return ResumeReply(status="running", message="just finished")
            table.finished.pop(msg.rid)
        return msgspec.structs.replace(req, resume_output_ids=list(msg.output_ids), first_seq=msg.first_seq)

    def expired(self) -> list[TokenizedRequest]:
        """Takes out the requests parked for longer than PARK_TIMEOUT."""
        now = self.clock()
        out = [req for at, req in self.parked.values() if now - at > PARK_TIMEOUT]
        for req in out:
            del self.parked[req.rid]
        return out
