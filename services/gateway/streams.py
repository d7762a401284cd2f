"""Per-request output state: reorder by `seq`, accumulate, hold back possible stop-string prefixes.

Invariants of a `RequestStream`:
- steps are applied strictly in `seq` order 0, 1, 2, ...; a step that arrives early waits in
  `_pending` until every earlier one has been applied; a repeated seq is ignored;
- `output_ids` and `released` only grow: an HTTP handler may read them at any time, and what it has
  sent stays a prefix of what it will send next;
- while the request runs, `released` never includes the last `hold` characters of the text received
  so far (`hold` = longest stop string - 1): they could be the start of a stop string that the
  detokenizer trims once it is complete;
- once `done`, nothing changes any more; `final_text` is the detokenizer's `full_text` when it sent
  one (the exact text, stop string trimmed), else the concatenated deltas;
- a resumed request (services/gateway/migrate.py) continues at a new seq epoch `first_seq`, above
  every seq of its earlier runs: `switch_epoch` moves `next_seq` there, so a late step of an earlier
  run counts as a duplicate; while a resume is being decided (`resuming`), steps wait in `_pending`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from shared.messages import FinishReason, RequestError, TextBatch, TextOutput

log = logging.getLogger("gateway.streams")


class RequestStream:
    def __init__(self, rid: str, stop: list[str] | None = None) -> None:
        self.rid = rid
        self.hold = max((len(s) for s in stop or ()), default=1) - 1
        self.next_seq = 0
        self._pending: dict[int, TextOutput] = {}
        self._received = ""  # concatenated deltas, in seq order
        self.released = ""  # the text a streaming client may see; always a prefix of the final text
        self.output_ids: list[int] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.logprobs: dict[str, list] = {}  # return_logprob: meta_info key -> accumulated entries
        self.token_bytes: dict[int, bytes] = {}  # token id -> its bytes, for the ids in `logprobs`
        self.finish: FinishReason | None = None
        self.final_text: str | None = None  # set once finished
        self.error: RequestError | None = None
        self.done = False
        self.changed = asyncio.Event()  # set on every change; the reader clears it
        self.last_progress = time.monotonic()  # when a step was last applied (stall detection)
        self.resuming = False
        self.cut_off = False  # ended by the gateway (shutdown) while its scheduler still runs it

    # --- writer side (the bus subscription) -----------------------------------------------------

    def feed(self, out: TextOutput | RequestError) -> None:
        if self.done:
            return
        if isinstance(out, RequestError):
            self.error = out
            self._end()
            return
        if out.seq < self.next_seq or out.seq in self._pending:
            log.debug("duplicate step rid=%s seq=%d", self.rid, out.seq)
            return
        self._pending[out.seq] = out
        self._drain()

    def _drain(self) -> None:
        applied = False
        while not self.done and not self.resuming and self.next_seq in self._pending:
            self._apply(self._pending.pop(self.next_seq))
            self.next_seq += 1
            applied = True
        if applied:
            self.last_progress = time.monotonic()
            self.changed.set()

    # --- resume (migration, lost steps) -------------------------------------------------------

    def begin_resume(self) -> None:
        """Freezes the applied output while the gateway asks to continue the request elsewhere."""
        self.resuming = True

    def switch_epoch(self, first_seq: int) -> None:
        """The request continues at seq `first_seq` from the output applied so far."""
        assert first_seq > self.next_seq
        self.resuming = False
        self.next_seq = first_seq
        self._pending = {k: v for k, v in self._pending.items() if k >= first_seq}
        self.last_progress = time.monotonic()
        self._drain()

    def cancel_resume(self) -> None:
        self.resuming = False
        self._drain()

    def _apply(self, out: TextOutput) -> None:
        self._received += out.text
        self.output_ids.extend(out.new_ids)
        self.prompt_tokens = out.prompt_tokens
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        for key in ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs"):
            got = getattr(out, key)
            if got is not None:
                self.logprobs.setdefault(key, []).extend(got)
        if out.token_bytes:
            self.token_bytes.update(out.token_bytes)
        if out.finish is None:
            safe = len(self._received) - self.hold
            if safe > len(self.released):
                self.released = self._received[:safe]
            return
        if out.finish.type == "abort" and out.finish.status is not None and not self.output_ids:
            # refused by its scheduler before it ran (a constraint that does not compile): an error
            self.error = RequestError(rid=self.rid, message=out.finish.message or "refused", status=out.finish.status)
            self._end()
            return
        self.finish = out.finish
        final = out.full_text if out.full_text is not None else self._received
        self.final_text = final
        if final.startswith(self.released):
            self.released = final
        else:
            # The detokenizer broke its contract; never unsend text: the stream stops where it is.
            log.warning("streamed text is not a prefix of full_text rid=%s", self.rid)
        self._end()

    def cut(self, message: str, status: int) -> None:
        """Ends the request here, with an error, while it may still run on its scheduler."""
        if self.done:
            return
        self.error = RequestError(rid=self.rid, message=message, status=status)
        self.cut_off = True
        self._end()

    @property
    def unfinished(self) -> bool:
        """A scheduler may still be running it: the handler that leaves must abort it."""
        return not self.done or self.cut_off

    def _end(self) -> None:
        self.done = True
        self._pending.clear()
        self.changed.set()

    # --- reader side (the HTTP handler) ---------------------------------------------------------

    async def wait_changed(self) -> None:
        """Returns once something changed since the last call (changes coalesce)."""
        await self.changed.wait()
        self.changed.clear()

    @property
    def received_nothing(self) -> bool:
        """No step of the request arrived yet (applied or waiting)."""
        return self.next_seq == 0 and not self._pending

    @property
    def text(self) -> str:
        """The request's text: the final text once finished, else what may be shown so far."""
        return self.final_text if self.final_text is not None else self.released


class Streams:
    """rid -> RequestStream for the requests this gateway has in progress."""

    def __init__(self) -> None:
        self._by_rid: dict[str, RequestStream] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def __contains__(self, rid: object) -> bool:
        return rid in self._by_rid

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_rid)

    def get(self, rid: str) -> RequestStream | None:
        return self._by_rid.get(rid)

    def open(self, rid: str, stop: list[str] | None = None) -> RequestStream:
        if rid in self._by_rid:
            raise KeyError(rid)
        stream = self._by_rid[rid] = RequestStream(rid, stop)
        return stream

    def close(self, rid: str) -> None:
        self._by_rid.pop(rid, None)

    def feed(self, batch: TextBatch) -> None:
        for out in batch.outputs:
            stream = self._by_rid.get(out.rid)
            if stream is None:  # aborted, timed out, or another gateway's: nobody is waiting
                log.debug("output for unknown rid=%s", out.rid)
                continue
            stream.feed(out)


# --- waiting on several streams (OpenAI's choices, a whole response) ------------------------------


async def wait_finished(streams: list[RequestStream], timeout: float) -> None:
    """Until every stream is done or one failed; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not any(s.error is not None for s in streams):
            running = [s for s in streams if not s.done]
            if not running:
                return
            await any_changed(running)


async def any_changed(waiting: list[RequestStream]) -> None:
    """Returns once any of `waiting` changed (at once if one is done or none is given)."""
    if not waiting or any(s.done for s in waiting):
        return
    if len(waiting) == 1:
        await waiting[0].wait_changed()
        return
    tasks = [asyncio.ensure_future(s.wait_changed()) for s in waiting]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
