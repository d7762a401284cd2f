"""Graceful shutdown of a gateway: stop accepting, let running requests finish, then exit.

On SIGTERM the gateway sets `draining`: from then on every route but `GET /metrics` answers 503
with `Retry-After` (`/health` too, so load balancers stop sending), while the requests already in
progress keep streaming. `drain_requests` returns once none is left or after the grace period
(`--shutdown-grace-period`). What is still running then is cut: each request ends with a 503 "the
server is shutting down" (a streaming one gets it as its last event, then `[DONE]`), and its handler
aborts it on its scheduler as it leaves. The HTTP server then closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.gateway.replies import Handler, json_error
from services.gateway.streams import Streams

log = logging.getLogger("gateway.shutdown")

ALWAYS_OPEN = {"/metrics"}
CUT_WAIT_S = 2.0  # for the handlers of cut requests to answer before the HTTP server closes


class Draining:
    def __init__(self) -> None:
        self.active = False

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def refuse_while_draining(request: web.Request, handler: Handler) -> web.StreamResponse:
            if self.active and request.path not in ALWAYS_OPEN:
                return json_error("the server is shutting down", 503)
            return await handler(request)

        return refuse_while_draining


async def drain_requests(draining: Draining, streams: Streams, grace: float) -> None:
    draining.active = True
    deadline = time.monotonic() + grace
    log.info("draining: %d requests in progress, grace %.1fs", len(streams), grace)
    while len(streams) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if not len(streams):
        log.info("drained")
        return
    log.warning("grace period over: cancelling %d requests", len(streams))
    for rid in list(streams):
        stream = streams.get(rid)
        if stream is not None:
            stream.cut("the server is shutting down", 503)
    # the handlers answer, abort on the schedulers and close their streams
    deadline = time.monotonic() + CUT_WAIT_S
    while len(streams) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
