"""`GatewayState`: everything the route handlers touch, and the one owner of a request's life here.

A request's life in this gateway, written once for every route (`/generate`, the OpenAI routes,
`/health_generate`):
- `submit(req)` checks its rid and the queue bound, opens its stream, starts its metric timers,
  keeps its copy for resubmission (services/gateway/migrate.py) and publishes it on the tokenize
  subject; a request that could not be published leaves nothing behind;
- the handler reads the stream (`running(req)` is `submit` + `release` around a block);
- `release(stream)` closes the stream as the handler leaves and, if a scheduler may still run
  the request (client gone, timeout, shutdown cut, a sibling choice failed), aborts it.

Invariants:
- a rid is in `streams` exactly between `submit` and `release`, so `len(streams)` is the number of
  requests in progress, bounded by `--max-queued-requests`;
- an abort is published in the background (`abort`), so a cancelled handler can still send it;
  `drain` waits for those in flight.

The route modules import this one and it never imports them: imports run one way
(tests/unit/test_gateway.py checks the gateway's import graph).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.gateway.bus import Publisher, Requester
from services.gateway.liveness import Liveness
from services.gateway.metrics import GatewayMetrics
from services.gateway.migrate import Recovery
from services.gateway.shutdown import Draining
from services.gateway.streams import RequestStream, Streams
from shared.config import ServerArgs
from shared.messages import Abort, GenerateRequest, TextBatch
from shared.subjects import Subjects

log = logging.getLogger("gateway")


class SubmitError(Exception):
    """A request refused before it left: answered with `status` and this message."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class GatewayState:
    def __init__(
        self,
        bus: Publisher,
        subjects: Subjects,
        args: ServerArgs,
        gateway_id: str = "",
        requester: Requester | None = None,
    ) -> None:
        self.bus = bus
        self.requester = requester  # request/reply to the dispatcher (GET /get_loads, resumes); None in tests
        self.subjects = subjects
        self.args = args
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self.created = int(time.time())
        self.streams = Streams()
        self.metrics = GatewayMetrics()
        # the metrics see only the load reports that liveness accepts (no forged or nonsense rank)
        self.liveness = Liveness(args.dead_rank_timeout, args.dp_size, then=self.metrics.on_report)
        self.recovery = Recovery(self.streams, subjects, self.gateway_id, bus, requester)
        self.draining = Draining()  # set on SIGTERM: new requests get 503 (services/gateway/shutdown.py)
        self._tasks: set[asyncio.Task[None]] = set()  # aborts being published

    # --- a request's life ---------------------------------------------------------------------

    async def submit(self, req: GenerateRequest) -> RequestStream:
        """Opens `req`'s stream and publishes it; raises SubmitError. The caller must `release` it."""
        if req.rid in self.streams:
            raise SubmitError(f"a request with rid {req.rid!r} is already in progress", 400)
        if len(self.streams) >= self.args.max_queued_requests:
            raise SubmitError("too many requests in progress", 503)
        stream = self.streams.open(req.rid, req.sampling.stop)
        self.metrics.on_start(req.rid)
        self.recovery.remember(req)
        published = False
        try:
            await self.bus.publish(self.subjects.tokenize, req)
            published = True
        except Exception as e:
            log.warning("request not published rid=%s error=%r", req.rid, e)
            raise SubmitError("the serving bus is unavailable", 503) from None
        finally:
            if not published:  # failed or cancelled: the request never left
                self.streams.close(req.rid)
                self.metrics.forget(req.rid)
                self.recovery.forget(req.rid)
        return stream

    def release(self, stream: RequestStream) -> None:
        """The handler leaves: closes the stream, and aborts the request if it may still run."""
        self.streams.close(stream.rid)
        self.recovery.forget(stream.rid)
        if stream.unfinished:
            self.abort(stream.rid)

    @asynccontextmanager
    async def running(self, req: GenerateRequest) -> AsyncIterator[RequestStream]:
        stream = await self.submit(req)
        try:
            yield stream
        finally:
            self.release(stream)

    async def on_output(self, batch: TextBatch) -> None:
        """Bus handler for `subjects.out(gateway_id)`: migration notices go to recovery, the rest
        to the metrics and the streams."""
        batch = self.recovery.intercept(batch)
        self.metrics.observe(batch)
        self.streams.feed(batch)

    # --- aborts -------------------------------------------------------------------------------

    def abort(self, rid: str) -> None:
        """Tells the schedulers to drop `rid`, in the background; safe to call from a cancelled handler."""
        task = asyncio.get_running_loop().create_task(self._abort_logged(rid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish_abort(self, rid: str) -> None:
        """Ends `rid`'s timers and tells the schedulers to drop it; raises if the bus fails."""
        self.metrics.on_abort(rid)
        await self.bus.publish(self.subjects.sched_control, Abort(rid=rid))

    async def _abort_logged(self, rid: str) -> None:
        try:
            await self.publish_abort(rid)
        except Exception as e:
            log.warning("abort not published rid=%s error=%r", rid, e)

    async def drain(self) -> None:
        """Waits for the aborts in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
