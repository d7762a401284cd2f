"""Recovery of requests whose rank died or whose steps were lost on the way back.

The gateway holds each request's applied output (`RequestStream.output_ids`, in seq order), so it
is the one that continues a request elsewhere:

- **migration**: the dispatcher sends `RequestError(migrate=True)` when the rank serving a request
  died; `intercept` takes the notice out of the output batch and asks the dispatcher to `Resume`
  the request with the output ids applied so far; the new rank feeds prompt + those ids and
  continues (greedy output is the same as without the failure);
- **stall**: a request that made no progress for `STALL_S` seconds (a lost step leaves a gap in
  its seqs; a lost final leaves it waiting) is checked with a `Resume(mode="stall")`: the
  dispatcher re-dispatches it only if it is no longer running anywhere (it finished, but its last
  outputs never arrived) and else answers where it is. A request that the dispatcher does not know
  `UNKNOWN_LIMIT` times in a row was lost before reaching it (a tokenizer died, or NATS restarted):
  it is submitted again if nothing of it arrived yet, else it ends with a clear 503.

Each resume moves the request to a new seq epoch (`epoch << EPOCH_BITS`), so a late step of an
earlier run is ignored as a duplicate.

`originals` holds the request as first published (`remember`, called by `GatewayState.submit`) until
its handler lets it go (`forget`): what a lost request is submitted again from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from services.gateway.bus import Publisher, Requester
from services.gateway.streams import RequestStream, Streams
from shared.messages import GenerateRequest, RequestError, Resume, ResumeReply, TextBatch
from shared.subjects import Subjects

log = logging.getLogger("gateway.migrate")

EPOCH_BITS = 32
STALL_S = 2.0  # no progress for this long: ask the dispatcher where the request is
CHECK_EVERY_S = 0.25
UNKNOWN_LIMIT = 2  # "unknown" answers in a row before the request counts as lost
RECHECK_UNKNOWN_S = 0.5  # after an "unknown": long enough for a request in transit to reach the dispatcher
MAX_RESUMES = 8  # migrations + re-runs per request
RESUME_TIMEOUT_S = 2.0


@dataclass
class _Track:
    epoch: int = 0
    resumes: int = 0
    unknown: int = 0
    last_check: float = 0.0
    busy: bool = False


class Recovery:
    def __init__(
        self, streams: Streams, subjects: Subjects, gateway_id: str, bus: Publisher, requester: Requester | None
    ) -> None:
        self.streams = streams
        self.subjects = subjects
        self.gateway_id = gateway_id
        self.bus = bus  # to submit a lost request again
        self.requester = requester  # request/reply to the dispatcher; None: resumes get no answer
        self.originals: dict[str, GenerateRequest] = {}  # rid -> as published (in progress only)
        self.tracks: dict[str, _Track] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def remember(self, req: GenerateRequest) -> None:
        self.originals[req.rid] = req

    def forget(self, rid: str) -> None:
        self.originals.pop(rid, None)
        self.tracks.pop(rid, None)

    # --- migration notices ------------------------------------------------------------------

    def intercept(self, batch: TextBatch) -> TextBatch:
        """Takes the migration notices out of `batch` and starts their resumes."""
        if not any(isinstance(o, RequestError) and o.migrate for o in batch.outputs):
            return batch
        kept: list[Any] = []
        for out in batch.outputs:
            if not (isinstance(out, RequestError) and out.migrate):
                kept.append(out)
                continue
            stream = self.streams.get(out.rid)
            if stream is None or stream.done:
                continue  # nobody waits for it any more
            if self._track(out.rid).resumes >= MAX_RESUMES:
                kept.append(RequestError(rid=out.rid, message=out.message + f" (gave up after {MAX_RESUMES} resumes)", status=503))
                continue
            log.warning("migrating rid=%s output_ids=%d: %s", out.rid, len(stream.output_ids), out.message)
            self._spawn(self.resume(stream, "migrate"))
        return TextBatch(outputs=kept)

    # --- resume ------------------------------------------------------------------------------

    async def resume(self, stream: RequestStream, mode: str) -> ResumeReply | None:
        """Asks the dispatcher to continue `stream`'s request from its applied output; None: no answer."""
        track = self._track(stream.rid)
        if track.busy or stream.done:
            return None
        track.busy = True
        track.epoch += 1
        first_seq = track.epoch << EPOCH_BITS
        stream.begin_resume()
        msg = Resume(
            rid=stream.rid,
            gateway_id=self.gateway_id,
            output_ids=list(stream.output_ids),
            first_seq=first_seq,
            mode=mode,
        )
        reply: ResumeReply | None = None
        try:
            if self.requester is not None:
                reply = await self.requester.request(
                    self.subjects.dispatcher_resume, msg, ResumeReply, timeout=RESUME_TIMEOUT_S
                )
        except Exception as e:
            log.warning("resume rid=%s mode=%s: no answer from the dispatcher (%r)", stream.rid, mode, e)
        finally:
            track.busy = False
        if reply is not None and reply.status == "dispatched":
            track.resumes += 1
            track.unknown = 0
            stream.switch_epoch(first_seq)
            log.info("resumed rid=%s mode=%s output_ids=%d first_seq=%d", stream.rid, mode, len(msg.output_ids), first_seq)
        else:
            stream.cancel_resume()
            if mode == "migrate":
                why = reply.message or reply.status if reply is not None else "the dispatcher did not answer"
                stream.feed(RequestError(rid=stream.rid, message=f"the request could not be migrated: {why}", status=503))
        return reply

    # --- stall watchdog ------------------------------------------------------------------------

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            self._prune()
            now = time.monotonic()
            for rid in list(self.streams):
                stream = self.streams.get(rid)
                if stream is None or stream.done or stream.resuming:
                    continue
                track = self._track(rid)
                if now - stream.last_progress < STALL_S or now - track.last_check < STALL_S or track.busy:
                    continue
                track.last_check = now
                self._spawn(self.check_stalled(stream))

    async def check_stalled(self, stream: RequestStream) -> None:
        reply = await self.resume(stream, "stall")
        if reply is None or stream.done:
            return
        track = self._track(stream.rid)
        if reply.status != "unknown":
            track.unknown = 0
            return
        track.unknown += 1
        if track.unknown < UNKNOWN_LIMIT:
            track.last_check = time.monotonic() - STALL_S + RECHECK_UNKNOWN_S
            return
        track.unknown = 0
        original = self.originals.get(stream.rid)
        nothing_yet = stream.received_nothing
        if original is not None and nothing_yet and track.resumes < MAX_RESUMES:
            track.resumes += 1
            # A new epoch, as for a resume: should the original only have been delayed and run
            # after all, its steps count as duplicates here and never mix with the new run's.
            track.epoch += 1
            again = msgspec.structs.replace(original, first_seq=track.epoch << EPOCH_BITS)
            stream.switch_epoch(again.first_seq)
            log.warning("rid=%s was lost before reaching a rank; submitting it again", stream.rid)
            try:
                await self.bus.publish(self.subjects.tokenize, again)
            except Exception as e:
                log.warning("resubmission of rid=%s failed: %r", stream.rid, e)
            return
        log.warning("rid=%s was lost: no service holds it any more", stream.rid)
        stream.feed(RequestError(rid=stream.rid, message="the request was lost: no service holds it any more", status=503))

    # --- helpers ---------------------------------------------------------------------------------

    def _track(self, rid: str) -> _Track:
        track = self.tracks.get(rid)
        if track is None:
            track = self.tracks[rid] = _Track(last_check=time.monotonic())
        return track

    def _prune(self) -> None:
        """Drops what a resume task recorded after its request's handler had left."""
        streams = self.streams
        for table in (self.originals, self.tracks):
            for rid in [r for r in table if r not in streams]:
                del table[rid]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
