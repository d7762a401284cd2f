"""The HTTP front door: SGLang's `/generate` on aiohttp, results from the bus.

`GatewayState` is everything the handlers touch; `build_app(state)` builds the aiohttp app from it,
so tests run the app with a fake bus and no NATS. `GatewayService` wires the state to the real bus.

Invariants:
- a rid is in `state.streams` exactly while its HTTP handler runs (the handler closes it in
  `finally`), so `len(state.streams)` is the number of requests in progress;
- a handler that ends before its request finished (client gone, timeout) publishes `Abort(rid)` on
  `subjects.sched_control` so the schedulers free the request;
- every error answer is JSON: `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Protocol

import msgspec
from aiohttp import web

from services.gateway.auth import api_key_middleware
from services.gateway.liveness import Liveness
from services.gateway.metrics import GatewayMetrics, add_metrics_routes
from services.gateway.migrate import Recovery
from services.gateway.openai import add_openai_routes
from services.gateway.openapi import OPENAPI
from services.gateway.protocol import GenerateResponse, InvalidRequest, MetaInfo, logprob_meta, parse_generate
from services.gateway.replies import (
    MAX_BODY_BYTES,
    SSE_DONE,
    TOO_LARGE,
    end_sse_with_error,
    error_body,
    json_error,
    json_errors,
    json_response,
    open_sse,
    sse_event,
    timed_out,
)
from services.gateway.sglang_routes import add_sglang_routes
from services.gateway.shutdown import Draining, drain_requests
from services.gateway.streams import RequestStream, Streams
from shared.actor import Service
from shared.config import ServerArgs
from shared.messages import Abort, GenerateRequest, LoadReport, LoadTableQuery, LoadTableReply, TextBatch
from shared.metrics import MetricsSnapshot, publish_snapshots
from shared.subjects import Subjects

log = logging.getLogger("gateway")

DP_RANK_HEADER = "X-Data-Parallel-Rank"
STATE_KEY: web.AppKey[GatewayState] = web.AppKey("dpserve_gateway_state")


class Publisher(Protocol):
    async def publish(self, subject: str, msg: msgspec.Struct) -> None: ...


class GatewayState:
    def __init__(self, bus: Publisher, subjects: Subjects, args: ServerArgs, gateway_id: str = "") -> None:
        self.metrics = GatewayMetrics()
        self.bus: Publisher = self.metrics.watch(bus)  # the metrics see requests start and abort
        self.subjects = subjects
        self.args = args
        self.gateway_id = gateway_id or uuid.uuid4().hex
        self.streams = Streams()
        # the metrics see only the load reports that liveness accepts (no forged or nonsense rank)
        self.liveness = Liveness(args.dead_rank_timeout, args.dp_size, then=self.metrics.on_report)
        self.draining = Draining()  # set on SIGTERM: new requests get 503 (services/gateway/shutdown.py)
        self.created = int(time.time())
        self._tasks: set[asyncio.Task[None]] = set()
        self.requester: Any = None  # the real bus (request/reply) for GET /get_loads; None in tests

    def abort(self, rid: str) -> None:
        """Tells the schedulers to drop `rid`; safe to call from a cancelled handler."""
        task = asyncio.get_running_loop().create_task(self._publish_abort(rid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_abort(self, rid: str) -> None:
        try:
            await self.bus.publish(self.subjects.sched_control, Abort(rid=rid))
        except Exception as e:
            log.warning("abort not published rid=%s error=%r", rid, e)

    async def drain(self) -> None:
        """Waits for the aborts in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


class Gateway:
    """The route handlers over one GatewayState."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state

    # --- /generate ------------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        t0 = time.monotonic()
        created = time.time()
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return json_error(TOO_LARGE, 413)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(TOO_LARGE, 413)
        try:
            req = parse_generate(body, state.gateway_id, created)
            _apply_dp_rank_header(request, req)
        except InvalidRequest as e:
            return json_error(str(e), 400)
        if req.rid in state.streams:
            return json_error(f"a request with rid {req.rid!r} is already in progress", 400)
        if len(state.streams) >= state.args.max_queued_requests:
            return json_error("too many requests in progress", 503)

        stream = state.streams.open(req.rid, req.sampling.stop)
        published = False
        try:
            try:
                await state.bus.publish(state.subjects.tokenize, req)
            except Exception as e:
                log.warning("generate request not published rid=%s error=%r", req.rid, e)
                return json_error("the serving bus is unavailable", 503)
            published = True
            if req.stream:
                return await self._respond_stream(request, req, stream, t0)
            return await self._respond_whole(req, stream, t0)
        finally:
            state.streams.close(req.rid)
            if published and stream.unfinished:
                state.abort(req.rid)

    async def _respond_whole(self, req: GenerateRequest, stream: RequestStream, t0: float) -> web.Response:
        try:
            async with asyncio.timeout(self.state.args.request_timeout):
                while not stream.done:
                    await stream.wait_changed()
        except TimeoutError:
            return json_error(timed_out(self.state.args.request_timeout), 504)
        if stream.error is not None:
            return json_error(stream.error.message, stream.error.status)
        return json_response(_snapshot(stream, t0, stream.text, final=True))

    async def _respond_stream(
        self, request: web.Request, req: GenerateRequest, stream: RequestStream, t0: float
    ) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        timeout = self.state.args.request_timeout
        try:
            async with asyncio.timeout(timeout):
                # Headers wait for the first step, so an early error (bad prompt) keeps its status.
                await stream.wait_changed()
                if stream.error is not None:
                    return json_error(stream.error.message, stream.error.status)
                resp = await open_sse(request)
                sent = (-1, -1)  # (len(text), len(output_ids)) in the last event
                while True:
                    if stream.error is not None:
                        await resp.write(sse_event(error_body(stream.error.message, stream.error.status)))
                        break
                    # Read once: the final output may land while an event is being written, and
                    # the event sent last must be the final one.
                    done = stream.done
                    now = (len(stream.released), len(stream.output_ids))
                    if now != sent or done:
                        # Cumulative, like SGLang; `released` stays monotonic even if the
                        # detokenizer's full_text disagrees with what was already streamed.
                        event = _snapshot(stream, t0, stream.released, final=done)
                        await resp.write(sse_event(event))
                        sent = now
                    if done:
                        break
                    await stream.wait_changed()
                await resp.write(SSE_DONE)
        except TimeoutError:
            if resp is None:
                return json_error(timed_out(timeout), 504)
            await end_sse_with_error(resp, error_body(timed_out(timeout), 504))
        except ConnectionError:  # the client went away mid-stream; `generate` aborts the request
            log.info("client disconnected rid=%s", req.rid)
        assert resp is not None
        return resp

    # --- the rest ---------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.state.liveness.live_ranks():
            return json_response({"status": "ok"})
        return json_response({"status": "no live scheduler rank"}, 503)

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.state.args.model_name,
            "object": "model",
            "created": self.state.created,
            "owned_by": "dpserve",
        }
        return json_response({"object": "list", "data": [model]})


def _snapshot(stream: RequestStream, t0: float, text: str, final: bool) -> GenerateResponse:
    """A response body: the whole result, or one streamed event (finish_reason null until final)."""
    return GenerateResponse(
        text=text,
        output_ids=list(stream.output_ids),
        meta_info=MetaInfo(
            id=stream.rid,
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens,
            cached_tokens=stream.cached_tokens,
            finish_reason=stream.finish if final else None,
            e2e_latency=round(time.monotonic() - t0, 6),
            **logprob_meta(stream.logprobs),
        ),
    )


def _apply_dp_rank_header(request: web.Request, req: GenerateRequest) -> None:
    """`X-Data-Parallel-Rank: k` routes the request to DP rank k (the body's routed_dp_rank wins)."""
    value = request.headers.get(DP_RANK_HEADER)
    if value is None or req.routed_dp_rank is not None:
        return
    try:
        rank = int(value)
    except ValueError:
        raise InvalidRequest(f"{DP_RANK_HEADER} must be an integer, got {value!r}") from None
    if rank < 0:
        raise InvalidRequest(f"{DP_RANK_HEADER} must be >= 0")
    req.routed_dp_rank = rank


async def get_loads(request: web.Request) -> web.Response:
    """The dispatcher's load table, one entry per DP rank; 503 when the dispatcher does not answer."""
    state: GatewayState = request.app[STATE_KEY]
    if state.requester is None:
        return json_error("the dispatcher is not reachable from this gateway", 503)
    try:
        reply = await state.requester.request(state.subjects.dispatcher_loads, LoadTableQuery(), LoadTableReply, timeout=2.0)
    except Exception as e:
        log.warning("get_loads: no answer from the dispatcher: %r", e)
        return json_error("the dispatcher did not answer", 503)
    ranks = [msgspec.structs.asdict(r) for r in reply.ranks]
    for r in ranks:
        r["kv_usage"] = round(r["kv_used"] / r["kv_total"], 4) if r["kv_total"] else 0.0
    return json_response({"load_balance_method": reply.method, "ranks": ranks})


def build_app(state: GatewayState) -> web.Application:
    middlewares = [json_errors] + ([api_key_middleware(state.args.api_key)] if state.args.api_key else [])
    middlewares = [*middlewares, state.draining.middleware()]
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    gw = Gateway(state)
    app.router.add_post("/generate", gw.generate)
    app.router.add_get("/health", gw.health)
    app.router.add_get("/v1/models", gw.models)
    app[STATE_KEY] = state
    app.router.add_get("/get_loads", get_loads)
    add_openai_routes(app, state)
    add_sglang_routes(app, state)
    add_metrics_routes(app, state.metrics, state.gateway_id, lambda: len(state.streams))
    app.router.add_get("/openapi.json", openapi_json)
    return app


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(OPENAPI)


class GatewayService(Service):
    name = "gateway"
    state: GatewayState

    async def start(self) -> None:
        state = self.state = GatewayState(self.bus, self.subjects, self.args)
        state.requester = self.bus
        # migration and lost-step recovery (services/gateway/migrate.py)
        recovery = Recovery(state, self.bus)
        state.bus = recovery.watch(state.bus)
        self.spawn(recovery.watchdog())

        async def on_out(batch: TextBatch) -> None:
            batch = recovery.intercept(batch)
            state.metrics.observe(batch)
            state.streams.feed(batch)

        await self.bus.subscribe(self.subjects.out(state.gateway_id), TextBatch, on_out)
        await self.bus.subscribe(self.subjects.load_all, LoadReport, state.liveness.on_report)  # feeds metrics
        await self.bus.subscribe(self.subjects.metrics, MetricsSnapshot, state.metrics.snapshots.on_snapshot)
        self.spawn(
            publish_snapshots(
                self.bus,
                self.subjects.metrics,
                "gateway",
                state.gateway_id,
                lambda: state.metrics.local_samples(len(state.streams)),
            )
        )
        runner = web.AppRunner(
            build_app(state), handler_cancellation=True, access_log=None, shutdown_timeout=5.0
        )
        await runner.setup()
        # Closed in reverse: HTTP first (its handlers may publish aborts), then the aborts drain,
        # then (pushed by Service.run before start) the bus.
        self.stack.push_async_callback(state.drain)
        self.stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, self.args.host, self.args.port).start()
        self.log.info(
            "listening http://%s:%d gateway_id=%s", self.args.host, self.args.port, state.gateway_id
        )

    async def stop(self) -> None:
        """SIGTERM: refuse new requests, let running ones finish within the grace period."""
        await drain_requests(self.state.draining, self.state.streams, self.args.shutdown_grace_period)
