"""Run one GenerateRequest through the pipeline from a handler other than `/generate`.

`submitted(state, req)` opens the request's stream, publishes the request, yields the stream, and
on exit closes the stream and aborts the request if it had not finished (client gone, timeout,
a sibling of an `n > 1` request failed): the same lifecycle as `/generate`'s handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from services.gateway.streams import RequestStream
from shared.messages import GenerateRequest

if TYPE_CHECKING:
    from services.gateway.app import GatewayState

log = logging.getLogger("gateway")


class SubmitError(Exception):
    def __init__(self, message: str, status: int, retry_after: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after


@asynccontextmanager
async def submitted(state: GatewayState, req: GenerateRequest) -> AsyncIterator[RequestStream]:
    if req.rid in state.streams:
        raise SubmitError(f"a request with rid {req.rid!r} is already in progress", 400)
    if len(state.streams) >= state.args.max_queued_requests:
        raise SubmitError("too many requests in progress", 503, retry_after=True)
    stream = state.streams.open(req.rid, req.sampling.stop)
    published = False
    try:
        try:
            await state.bus.publish(state.subjects.tokenize, req)
        except Exception as e:
            log.warning("request not published rid=%s error=%r", req.rid, e)
            raise SubmitError("the serving bus is unavailable", 503, retry_after=True) from None
        published = True
        yield stream
    finally:
        state.streams.close(req.rid)
        if published and stream.unfinished:
            state.abort(req.rid)


async def wait_done(stream: RequestStream, timeout: float) -> None:
    """Until the request finished or failed; raises SubmitError(504) after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not stream.done:
                await stream.wait_changed()
    except TimeoutError:
        raise SubmitError(f"request timed out after {timeout:g}s", 504) from None
