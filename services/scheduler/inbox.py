"""What a DP group leader received from NATS since the last step boundary.

Requests and aborts that arrive while a step runs wait here and enter the engine at the next
boundary, in arrival order; a FlushCache waits until the rank is idle. `wake` is set on every
arrival, so an idle leader's loop runs again at once.
"""

from __future__ import annotations

import asyncio
import contextlib

from services.scheduler.dist_sync import StepInputs
from services.scheduler.request import Req
from shared.messages import TokenizedRequest


class Inbox:
    def __init__(self) -> None:
        self.reqs: list[Req] = []
        self.msgs: list[TokenizedRequest] = []  # the requests as received, for the group's followers
        self.aborts: list[str] = []
        self.flush = False  # until the rank is idle and flushes (flushed())
        self.wake = asyncio.Event()

    def add(self, msg: TokenizedRequest) -> None:
        self.reqs.append(Req.from_msg(msg))
        self.msgs.append(msg)
        self.wake.set()

    def abort(self, rid: str) -> None:
        self.aborts.append(rid)
        self.wake.set()

    def request_flush(self) -> None:
        self.flush = True
        self.wake.set()

    def flushed(self) -> None:
        self.flush = False

    def take(self) -> tuple[list[Req], StepInputs]:
        """This step's requests and the inputs to share with the group (the flush stays pending
        until flushed())."""
        reqs, inputs = self.reqs, StepInputs(reqs=self.msgs, aborts=self.aborts, flush=self.flush)
        self.reqs, self.msgs, self.aborts = [], [], []
        return reqs, inputs

    @property
    def empty(self) -> bool:
        """No request or abort waits (a pending flush does not count)."""
        return not (self.reqs or self.aborts)

    @property
    def holding_tokens(self) -> int:
        return sum(r.seq_len for r in self.reqs)

    async def wait(self, timeout: float | None) -> None:
        """Until something arrives (or `timeout` s pass); what arrived before this call counts only
        if it is still here."""
        self.wake.clear()
        if not self.empty:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
