"""OpenAI's `/v1/completions`, `/v1/chat/completions`, `/v1/models` and `/v1/models/{id}` over the
same pipeline as `/generate`.

A body (services/gateway/openai_protocol.py) becomes one GenerateRequest per choice, all run at
once through `GatewayState.running`; the response merges them. Every error is OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`. A choice that fails fails the response; the
others are aborted as the handler leaves.

Streaming follows OpenAI's chunk format: chat sends a first chunk per choice with
`delta.role = "assistant"`, then content deltas, then a chunk with `finish_reason` and an empty
delta; with `stream_options.include_usage` every chunk has `"usage": null` and one last chunk has
empty `choices` and the usage. `finish_reason` is "stop", "length", "tool_calls" (the choice made
tool calls), or, for an aborted choice, "abort" (OpenAI has no such reason; SGLang answers it).
Text deltas come from the stream's `released` text, so a stop string is never streamed (the
gateway's hold-back, services/gateway/streams.py).

A chat body with tools reads each choice's text through a reader (services/gateway/tool_calls.py):
the whole answer's `message` gets `tool_calls` (`content` the text around them, null when empty);
a stream sends the content the reader lets through as it comes, each completed call as one chunk
`delta.tool_calls = [{index, id, type, function: {name, arguments}}]`, then a chunk with
`finish_reason` "tool_calls" and an empty delta.

A streamed chunk carries the logprobs of the tokens received since the previous chunk of its choice
(services/gateway/openai_logprobs.py builds both shapes). Completions' `echo` puts the prompt before
the text (in the first chunk when streaming), and with logprobs the prompt's entries come first
(the first token's logprob is null). `echo` + `logprobs` + `max_tokens: 0` scores a prompt (an eval
harness's loglikelihood): the scheduler prefills it and samples nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import web

from services.gateway.openai_logprobs import chat_logprobs, completion_logprobs, num_entries, prompt_text
from services.gateway.openai_protocol import OpenAIError, OpenAIRequest, Prompt, parse_openai
from services.gateway.replies import (
    SSE_DONE,
    TOO_LARGE,
    end_sse_with_error,
    json_response,
    open_sse,
    openai_error,
    openai_error_body,
    sse_event,
    timed_out,
)
from services.gateway.state import GatewayState, SubmitError
from services.gateway.streams import RequestStream, any_changed, wait_finished
from services.gateway.tool_calls import ParsedCall, Read, Reader, read_whole, reader_for


class Choice:
    """One running choice: its index and stream, and how much of its text was streamed."""

    def __init__(
        self,
        index: int,
        prompt_index: int,
        stream: RequestStream,
        top: int | None = None,
        echo: Prompt | None = None,
        reader: Reader | None = None,
    ) -> None:
        self.index, self.prompt_index, self.stream = index, prompt_index, stream
        self.top = top  # None: no logprobs requested; else top logprobs per token (0..20)
        self.echo = echo  # completions' echo: the prompt (text or token ids); None: no echo
        self.reader = reader  # chat with tools: reads tool calls out of the text; None: plain text
        self.calls_sent = 0  # tool calls already streamed
        self.sent = 0  # characters of `stream.released` already streamed
        self.logprobs_sent = 0  # output positions whose logprobs were streamed
        self.started = False  # chat: the role chunk went out; completions: the first text chunk
        self.finished = False  # the finish_reason chunk went out

    def echo_text(self) -> str:
        """The echoed prompt: its text, or a token-id prompt spelled from its tokens' bytes."""
        if self.echo is None:
            return ""
        if isinstance(self.echo, str):
            return self.echo
        return prompt_text(self.stream)

    def logprobs_since(self, start: int, chat: bool) -> dict[str, Any] | None:
        """The logprobs object for the output positions from `start` on, and marks them sent;
        None when no logprobs were requested. With echo the prompt's entries lead the first one."""
        if self.top is None:
            return None
        end = num_entries(self.stream)
        self.logprobs_sent = end
        if chat:
            return chat_logprobs(self.stream, start, end)
        return completion_logprobs(self.stream, start, end, echo=self.echo is not None)


def finish_reason(stream: RequestStream, called: bool = False) -> str | None:
    """`called`: the choice made tool calls, which is its reason unless it was aborted."""
    if stream.finish is None:
        return None
    if called and stream.finish.type != "abort":
        return "tool_calls"
    return stream.finish.type if stream.finish.type in ("stop", "length", "abort") else "stop"


def chat_message(text: str, reader: Reader | None) -> dict[str, Any]:
    """A whole choice's message: its text, or the tool calls `reader` finds in it and the text
    around them (null when there is none)."""
    if reader is None:
        return {"role": "assistant", "content": text}
    got = read_whole(reader, text)
    if not got.calls:
        return {"role": "assistant", "content": got.content}
    return {"role": "assistant", "content": got.content or None, "tool_calls": [c.openai() for c in got.calls]}


def usage(choices: list[Choice]) -> dict[str, Any]:
    prompts: dict[int, RequestStream] = {}
    for c in choices:
        prompts.setdefault(c.prompt_index, c.stream)
    prompt_tokens = sum(s.prompt_tokens for s in prompts.values())
    cached = sum(s.cached_tokens for s in prompts.values())
    completion_tokens = sum(c.stream.completion_tokens for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class OpenAIRoutes:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    def _model(self) -> dict[str, Any]:
        return {"id": self.state.args.model_name, "object": "model", "created": self.state.created, "owned_by": "dpserve"}

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.state.args.model_name:
            return openai_error(f"The model `{name}` does not exist.", 404, "model")
        return json_response(self._model())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        created = time.time()
        try:
            parsed = parse_openai(await request.read(), chat, self.state.gateway_id, created)
        except OpenAIError as e:
            return openai_error(e.message, e.status, e.param)
        except web.HTTPRequestEntityTooLarge:
            return openai_error(TOO_LARGE, 413)
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + parsed.rid,
            "created": int(created),
            "model": self.state.args.model_name,
        }
        timeout = self.state.args.request_timeout
        try:
            async with contextlib.AsyncExitStack() as stack:
                streams = [await stack.enter_async_context(self.state.running(r)) for r in parsed.reqs]
                choices = [_choice(parsed, i, s) for i, s in enumerate(streams)]
                if parsed.stream:
                    return await self._stream(request, choices, meta, chat, parsed.include_usage)
                await wait_finished(streams, timeout)
                return self._whole(choices, meta, chat)
        except SubmitError as e:
            return openai_error(e.message, e.status)
        except TimeoutError:
            return openai_error(timed_out(timeout), 504)

    def _whole(self, choices: list[Choice], meta: dict[str, Any], chat: bool) -> web.Response:
        failed = next((c.stream.error for c in choices if c.stream.error is not None), None)
        if failed is not None:
            return openai_error(failed.message, failed.status)
        out = []
        for c in choices:
            text = c.stream.text
            item: dict[str, Any] = {"index": c.index}
            if chat:
                item["message"] = chat_message(text, c.reader)
            else:
                item["text"] = c.echo_text() + text
            item["logprobs"] = c.logprobs_since(0, chat)
            item["finish_reason"] = finish_reason(c.stream, "tool_calls" in item.get("message", {}))
            if c.stream.finish is not None and c.stream.finish.matched is not None:
                item["matched_stop"] = c.stream.finish.matched
            out.append(item)
        kind = "chat.completion" if chat else "text_completion"
        return json_response(meta | {"object": kind, "choices": out, "usage": usage(choices)})

    async def _stream(
        self,
        request: web.Request,
        choices: list[Choice],
        meta: dict[str, Any],
        chat: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        kind = "chat.completion.chunk" if chat else "text_completion"
        base = meta | {"object": kind}

        def chunk(items: list[dict[str, Any]]) -> bytes:
            body = base | {"choices": items}
            if include_usage:
                body["usage"] = None
            return sse_event(body)

        timeout = self.state.args.request_timeout
        resp: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(timeout):
                # Headers wait for the first change, so an early error (bad prompt) keeps its status.
                await _any_changed(choices)
                failed = next((c.stream.error for c in choices if c.stream.error is not None), None)
                if failed is not None:
                    return openai_error(failed.message, failed.status)
                resp = await open_sse(request)
                while True:
                    failed = next((c.stream.error for c in choices if c.stream.error is not None), None)
                    if failed is not None:
                        await resp.write(sse_event(openai_error_body(failed.message, failed.status)))
                        break
                    for c in choices:  # one choice per chunk, as OpenAI sends them
                        for item in self._deltas(c, chat):
                            await resp.write(chunk([item]))
                    if all(c.finished for c in choices):
                        if include_usage:
                            await resp.write(sse_event(base | {"choices": [], "usage": usage(choices)}))
                        break
                    await _any_changed(choices)
                await resp.write(SSE_DONE)
        except TimeoutError:
            if resp is None:
                return openai_error(timed_out(timeout), 504)
            await end_sse_with_error(resp, openai_error_body(timed_out(timeout), 504))
        except ConnectionError:  # client gone: `release` aborts every unfinished choice
            pass
        assert resp is not None
        return resp

    @staticmethod
    def _deltas(c: Choice, chat: bool) -> list[dict[str, Any]]:
        if c.finished:
            return []
        out: list[dict[str, Any]] = []
        if chat and not c.started:
            out.append(
                {
                    "index": c.index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            c.started = True
        text = c.stream.released[c.sent :]
        c.sent = len(c.stream.released)
        if not chat and not c.started:
            text = c.echo_text() + text  # nothing of the choice went out yet: the prompt leads
            c.started = True
        calls: list[ParsedCall] = []
        if c.reader is not None:
            got = c.reader.feed(text) + (c.reader.finish() if c.stream.done else Read())
            text, calls = got.content, got.calls
        reason = finish_reason(c.stream, c.calls_sent + len(calls) > 0) if c.stream.done else None
        new_logprobs = c.top is not None and num_entries(c.stream) > c.logprobs_sent
        if text or new_logprobs or (reason is not None and not calls):
            item: dict[str, Any] = {"index": c.index}
            if chat:
                item["delta"] = {"content": text} if text else {}
            else:
                item["text"] = text
            item["logprobs"] = c.logprobs_since(c.logprobs_sent, chat)
            item["finish_reason"] = None if calls else reason
            out.append(item)
        for call in calls:  # one chunk per call, whole, as OpenAI streams a call's first delta
            delta = {"tool_calls": [{"index": c.calls_sent} | call.openai()]}
            out.append({"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None})
            c.calls_sent += 1
        if reason is not None and calls:
            out.append({"index": c.index, "delta": {}, "logprobs": None, "finish_reason": reason})
        c.finished = reason is not None
        return out


def _choice(parsed: OpenAIRequest, index: int, stream: RequestStream) -> Choice:
    prompt_index = index // parsed.n
    echo = parsed.prompts[prompt_index] if parsed.echo else None
    return Choice(index, prompt_index, stream, parsed.top, echo, reader_for(parsed.tools.read, parsed.tools.names))


async def _any_changed(choices: list[Choice]) -> None:
    """Returns once the stream of any choice not yet finished changed (at once if one is done)."""
    await any_changed([c.stream for c in choices if not c.finished])


def add_openai_routes(app: web.Application, state: GatewayState) -> None:
    routes = OpenAIRoutes(state)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_get("/v1/models/{model:.+}", routes.model)  # ids may hold a slash: org/name
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
