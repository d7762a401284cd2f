"""SGLang's `POST /generate`: one request or a batch through the pipeline, answered whole or as SSE
events.

The body is parsed by services/gateway/protocol.py into one GenerateRequest per generation (a
batch: every prompt × n); each runs through `GatewayState.running`, and one that fails fails the
response (the others are aborted as the handler leaves). A single request is answered with one
object, a batch with a JSON list in index order. A streamed answer is cumulative, like SGLang's:
each event carries one item's text and output ids so far, `finish_reason` null on all but its
last; a batch's events carry the item's `index` (items interleave as their steps arrive); then
`[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiohttp import web

from services.gateway.protocol import (
    GenerateCall,
    GenerateResponse,
    MetaInfo,
    logprob_meta,
    parse_generate_call,
)
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
from services.gateway.request_body import InvalidRequest
from services.gateway.state import GatewayState, SubmitError
from services.gateway.streams import RequestStream, any_changed, wait_finished

log = logging.getLogger("gateway")

DP_RANK_HEADER = "X-Data-Parallel-Rank"


class Item:
    """One generation of a `/generate` call: its stream, and what of it was streamed."""

    def __init__(self, index: int | None, stream: RequestStream) -> None:
        self.index = index  # None: a single request (its events carry no index)
        self.stream = stream
        self.sent = (-1, -1)  # (len(text), len(output_ids)) in its last event
        self.finished = False  # its final event went out


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
            call = parse_generate_call(body, self.state.gateway_id, created, self.state.args.max_queued_requests)
            _apply_dp_rank_header(request, call)
        except InvalidRequest as e:
            return json_error(str(e), 400)
        self.state.metrics.on_ignored_fields(call.ignored)
        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = [await stack.enter_async_context(self.state.running(r)) for r in call.reqs]
                items = [Item(i if call.batch else None, s) for i, s in enumerate(streams)]
                if call.stream:
                    return await self._respond_stream(request, call, items, t0)
                return await self._respond_whole(call, items, t0)
        except SubmitError as e:
            return json_error(e.message, e.status)

    async def _respond_whole(self, call: GenerateCall, items: list[Item], t0: float) -> web.Response:
        timeout = self.state.args.request_timeout
        try:
            await wait_finished([i.stream for i in items], timeout)
        except TimeoutError:
            return json_error(timed_out(timeout), 504)
        failed = _first_error(items)
        if failed is not None:
            return failed
        # non-streamed batch items carry no index (SGLang's list is in index order)
        out = [_snapshot(i.stream, t0, i.stream.text, True, call.text_in_logprobs) for i in items]
        return json_response(out if call.batch else out[0])

    async def _respond_stream(
        self, request: web.Request, call: GenerateCall, items: list[Item], t0: float
    ) -> web.StreamResponse:
        resp: web.StreamResponse | None = None
        timeout = self.state.args.request_timeout
        try:
            async with asyncio.timeout(timeout):
                # Headers wait for the first step, so an early error (bad prompt) keeps its status.
                await any_changed([i.stream for i in items])
                failed = _first_error(items)
                if failed is not None:
                    return failed
                resp = await open_sse(request)
                while True:
                    error = next((i.stream.error for i in items if i.stream.error is not None), None)
                    if error is not None:
                        await resp.write(sse_event(error_body(error.message, error.status)))
                        break
                    for item in items:
                        await self._send_progress(resp, item, call, t0)
                    if all(i.finished for i in items):
                        break
                    await any_changed([i.stream for i in items if not i.finished])
                await resp.write(SSE_DONE)
        except TimeoutError:
            if resp is None:
                return json_error(timed_out(timeout), 504)
            await end_sse_with_error(resp, error_body(timed_out(timeout), 504))
        except ConnectionError:  # the client went away mid-stream; `release` aborts the requests
            log.info("client disconnected rid=%s", call.reqs[0].rid)
        assert resp is not None
        return resp

    @staticmethod
    async def _send_progress(resp: web.StreamResponse, item: Item, call: GenerateCall, t0: float) -> None:
        """The item's event, if it changed since its last one (or just finished)."""
        if item.finished:
            return
        stream = item.stream
        # Read once: the final output may land while an event is being written, and the event
        # sent last must be the final one.
        done = stream.done
        now = (len(stream.released), len(stream.output_ids))
        if now == item.sent and not done:
            return
        # Cumulative, like SGLang; `released` stays monotonic even if the detokenizer's
        # full_text disagrees with what was already streamed.
        event = _snapshot(stream, t0, stream.released, done, call.text_in_logprobs, item.index)
        await resp.write(sse_event(event))
        item.sent = now
        item.finished = done


def _first_error(items: list[Item]) -> web.Response | None:
    error = next((i.stream.error for i in items if i.stream.error is not None), None)
    return None if error is None else json_error(error.message, error.status)


def _snapshot(
    stream: RequestStream, t0: float, text: str, final: bool, text_in_logprobs: bool, index: int | None = None
) -> GenerateResponse:
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
            **logprob_meta(stream.logprobs, stream.token_bytes if text_in_logprobs else None),
        ),
        index=index,
    )


def _apply_dp_rank_header(request: web.Request, call: GenerateCall) -> None:
    """`X-Data-Parallel-Rank: k` routes the requests to DP rank k (the body's routed_dp_rank wins)."""
    value = request.headers.get(DP_RANK_HEADER)
    if value is None or call.reqs[0].routed_dp_rank is not None:
        return
    try:
        rank = int(value)
    except ValueError:
        raise InvalidRequest(f"{DP_RANK_HEADER} must be an integer, got {value!r}") from None
    if rank < 0:
        raise InvalidRequest(f"{DP_RANK_HEADER} must be >= 0")
    for req in call.reqs:
        req.routed_dp_rank = rank


def add_generate_route(app: web.Application, state: GatewayState) -> None:
    app.router.add_post("/generate", GenerateRoute(state).generate)
