"""SGLang's `POST /generate`: one request through the pipeline, answered whole or as SSE events.

The body is parsed by services/gateway/protocol.py; the request's life (stream, timers, publish,
abort when the handler leaves early) is `GatewayState.running`. A streamed answer is cumulative,
like SGLang's: each event carries the text and output ids so far, `finish_reason` null on all but
the last, then `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from services.gateway.protocol import GenerateResponse, InvalidRequest, MetaInfo, logprob_meta, parse_generate
from services.gateway.replies import (
    MAX_BODY_BYTES,
    SSE_DONE,
    TOO_LARGE,
    end_sse_with_error,
    error_body,
    json_error,
    json_response,
    open_sse,
    sse_event,
    timed_out,
)
from services.gateway.state import GatewayState, SubmitError
from services.gateway.streams import RequestStream, wait_finished
from shared.messages import GenerateRequest

log = logging.getLogger("gateway")

DP_RANK_HEADER = "X-Data-Parallel-Rank"


class GenerateRoute:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    async def generate(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        created = time.time()
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return json_error(TOO_LARGE, 413)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(TOO_LARGE, 413)
        try:
            req = parse_generate(body, self.state.gateway_id, created)
            _apply_dp_rank_header(request, req)
        except InvalidRequest as e:
            return json_error(str(e), 400)
        try:
            async with self.state.running(req) as stream:
                if req.stream:
                    return await self._respond_stream(request, req, stream, t0)
                return await self._respond_whole(stream, t0)
        except SubmitError as e:
            return json_error(e.message, e.status)

    async def _respond_whole(self, stream: RequestStream, t0: float) -> web.Response:
        timeout = self.state.args.request_timeout
        try:
            await wait_finished([stream], timeout)
        except TimeoutError:
            return json_error(timed_out(timeout), 504)
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
        except ConnectionError:  # the client went away mid-stream; `release` aborts the request
            log.info("client disconnected rid=%s", req.rid)
        assert resp is not None
        return resp


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


def add_generate_route(app: web.Application, state: GatewayState) -> None:
    app.router.add_post("/generate", GenerateRoute(state).generate)
