"""OpenAI's `/v1/completions` and `/v1/chat/completions` over the same pipeline as `/generate`.

A request becomes `len(prompts) × n` GenerateRequests (choice index = prompt_index * n + j), each
its own rid `{id}-{index}`, all run at once through `GatewayState.running`; the response merges
them. Chat requests carry their messages to the tokenizer, which renders the model's chat
template (sandboxed jinja).

Bodies decode strictly (msgspec): an unknown or mistyped field is a 400 naming it. Every error is
OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Streaming follows OpenAI's chunk format: chat sends a first chunk per choice with
`delta.role = "assistant"`, then content deltas, then a chunk with `finish_reason` and an empty
delta; with `stream_options.include_usage` every chunk has `"usage": null` and one last chunk has
empty `choices` and the usage. Text deltas come from the stream's `released` text, so a stop string
is never streamed (the gateway's hold-back, services/gateway/streams.py).

Logprobs (chat `logprobs` + `top_logprobs`, completions `logprobs: k`) become /generate's
`return_logprob` + `top_logprobs_num`; a streamed chunk carries the entries of the tokens received
since the previous chunk of its choice (services/gateway/openai_logprobs.py builds both shapes).

Completions' `echo` puts the prompt before the text (in the first chunk when streaming). With
`logprobs`, or for a prompt of token ids (the gateway has no tokenizer), the request also asks for
the prompt's logprobs from position 0, whose entries come first (the first token's logprob is
null) and whose token bytes spell the echoed text. `echo` + `logprobs` + `max_tokens: 0` scores a
prompt (an eval harness's loglikelihood): the scheduler prefills it and samples nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from aiohttp import web
from msgspec import Struct

from services.gateway.openai_logprobs import (
    MAX_TOP_LOGPROBS,
    chat_logprobs,
    completion_logprobs,
    num_entries,
    prompt_text,
)
from services.gateway.protocol import InvalidRequest, check_encodable
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
from shared.messages import ChatMessage, GenerateRequest, SamplingParams

MAX_N = 64


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


class StreamOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageBody(Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Common(Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints share: OpenAI's, then SGLang's extensions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang / vLLM extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    rid: str | None = None


class CompletionBody(_Common, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[str | int | list[int]]  # a text, ids, or a batch of texts / id lists
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


Prompt = str | list[int] | list[ChatMessage]


def decode_body(raw: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as e:
        raise OpenAIError(f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise OpenAIError(f"body is not valid JSON: {e}") from None


def sampling_of(body: _Common, max_tokens: int | None, default_max: int) -> SamplingParams:
    if not 1 <= body.n <= MAX_N:
        raise OpenAIError(f"n must be between 1 and {MAX_N}", param="n")
    if body.logit_bias:
        raise OpenAIError("logit_bias is not supported", param="logit_bias")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        max_new_tokens=default_max if max_tokens is None else max_tokens,
        min_new_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        seed=body.seed,
    )
    problem = params.problem()
    if problem is not None:
        raise OpenAIError(problem.replace("max_new_tokens", "max_tokens"))
    return params


def check_top(k: int, param: str) -> int:
    if not 0 <= k <= MAX_TOP_LOGPROBS:
        raise OpenAIError(f"{param} must be between 0 and {MAX_TOP_LOGPROBS}", param=param)
    return k


def completion_prompts(body: CompletionBody) -> list[Prompt]:
    p = body.prompt
    if isinstance(p, str):
        prompts: list[Prompt] = [p]
    elif all(isinstance(x, int) for x in p):
        prompts = [[x for x in p if isinstance(x, int)]]
    elif any(isinstance(x, int) for x in p):
        raise OpenAIError("prompt mixes token ids with texts or id lists", param="prompt")
    else:
        prompts = [x if isinstance(x, str) else list(x) for x in p if isinstance(x, str | list)]
    if any(isinstance(x, list) and any(i < 0 for i in x) for x in prompts):
        raise OpenAIError("token ids must be >= 0", param="prompt")
    if not prompts or any(not x for x in prompts):
        raise OpenAIError("prompt must not be empty", param="prompt")
    return prompts


def chat_messages(body: ChatBody) -> list[ChatMessage]:
    if not body.messages:
        raise OpenAIError("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(
                        f"messages[{i}]: content parts of type {part.type!r} are not supported (text only)",
                        param="messages",
                    )
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        out.append(ChatMessage(role=m.role, content=content, name=m.name))
    return out



@dataclass(frozen=True)
class OpenAIRequest:
    """A valid body, as the response side needs it."""

    chat: bool
    rid: str
    n: int
    prompts: list[Prompt]
    top: int | None  # None: no logprobs; else top logprobs per token
    echo: bool
    stream: bool
    include_usage: bool
    reqs: list[GenerateRequest]  # choice i is reqs[i]


def parse_openai(raw: bytes, chat: bool, gateway_id: str, created: float) -> OpenAIRequest:
    """The GenerateRequests of a `/v1/chat/completions` (`chat`) or `/v1/completions` body;
    raises OpenAIError."""
    body: CompletionBody | ChatBody
    if chat:
        body = decode_body(raw, ChatBody)
        assert isinstance(body, ChatBody)
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError("top_logprobs requires logprobs: true", param="top_logprobs")
        top = check_top(body.top_logprobs or 0, "top_logprobs") if body.logprobs else None
        prompts: list[Prompt] = [chat_messages(body)]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling = sampling_of(body, max_tokens, SamplingParams().max_new_tokens)
    else:
        body = decode_body(raw, CompletionBody)
        assert isinstance(body, CompletionBody)
        top = None if body.logprobs is None else check_top(body.logprobs, "logprobs")
        if body.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        prompts = completion_prompts(body)
        sampling = sampling_of(body, body.max_tokens, 16)  # OpenAI's default for completions

    rid = body.rid or uuid.uuid4().hex
    echo = isinstance(body, CompletionBody) and body.echo
    reqs = []
    for p_index, prompt in enumerate(prompts):
        prompt_logprobs = echo and (top is not None or not isinstance(prompt, str))
        for j in range(body.n):
            index = p_index * body.n + j
            params = sampling
            if body.seed is not None and index:  # distinct but reproducible choices
                params = msgspec.structs.replace(sampling, seed=body.seed + index)
            reqs.append(
                GenerateRequest(
                    rid=f"{rid}-{index}",
                    gateway_id=gateway_id,
                    text=prompt if isinstance(prompt, str) else None,
                    input_ids=prompt
                    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int)
                    else None,  # type: ignore[arg-type]
                    messages=prompt if chat else None,  # type: ignore[arg-type]
                    sampling=params,
                    stream=body.stream,
                    created=created,
                    return_logprob=top is not None or prompt_logprobs,
                    top_logprobs_num=top or 0,
                    logprob_start_len=0 if prompt_logprobs else -1,
                )
            )
    try:
        for r in reqs:
            check_encodable(r)
    except InvalidRequest as e:
        raise OpenAIError(str(e)) from None
    return OpenAIRequest(
        chat=chat,
        rid=rid,
        n=body.n,
        prompts=prompts,
        top=top,
        echo=echo,
        stream=body.stream,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
        reqs=reqs,
    )


# --- the handlers -----------------------------------------------------------------------------


class Choice:
    """One running choice: its index and stream, and how much of its text was streamed."""

    def __init__(
        self,
        index: int,
        prompt_index: int,
        stream: RequestStream,
        top: int | None = None,
        echo: Prompt | None = None,
    ) -> None:
        self.index, self.prompt_index, self.stream = index, prompt_index, stream
        self.top = top  # None: no logprobs requested; else top logprobs per token (0..20)
        self.echo = echo  # completions' echo: the prompt (text or token ids); None: no echo
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


def finish_reason(stream: RequestStream) -> str | None:
    if stream.finish is None:
        return None
    return stream.finish.type if stream.finish.type in ("stop", "length") else "stop"


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

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.state.args.model_name,
            "object": "model",
            "created": self.state.created,
            "owned_by": "dpserve",
        }
        return json_response({"object": "list", "data": [model]})

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
                item["message"] = {"role": "assistant", "content": text}
            else:
                item["text"] = c.echo_text() + text
            item["logprobs"] = c.logprobs_since(0, chat)
            item["finish_reason"] = finish_reason(c.stream)
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
        reason = finish_reason(c.stream) if c.stream.done else None
        new_logprobs = c.top is not None and num_entries(c.stream) > c.logprobs_sent
        if text or reason is not None or new_logprobs:
            item: dict[str, Any] = {"index": c.index}
            if chat:
                item["delta"] = {"content": text} if text else {}
            else:
                item["text"] = text
            item["logprobs"] = c.logprobs_since(c.logprobs_sent, chat)
            item["finish_reason"] = reason
            out.append(item)
        c.finished = reason is not None
        return out


def _choice(parsed: OpenAIRequest, index: int, stream: RequestStream) -> Choice:
    prompt_index = index // parsed.n
    return Choice(index, prompt_index, stream, parsed.top, parsed.prompts[prompt_index] if parsed.echo else None)


async def _any_changed(choices: list[Choice]) -> None:
    """Returns once the stream of any choice not yet finished changed (at once if one is done)."""
    await any_changed([c.stream for c in choices if not c.finished])


def add_openai_routes(app: web.Application, state: GatewayState) -> None:
    routes = OpenAIRoutes(state)
    app.router.add_get("/v1/models", routes.models)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
