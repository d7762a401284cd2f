"""OpenAI request bodies: the GenerateRequests a `/v1/completions` or `/v1/chat/completions` body
becomes.

A body decodes as OpenAI reads it (services/gateway/request_body.py): `null` means the field's
default at any depth, unknown fields are ignored, and a mistyped or out-of-range field is an
`OpenAIError` (400) naming it. The fields, and those refused as features dpserve lacks:
services/gateway/openai_fields.py. `logit_bias` (token ids as strings -> bias in [-100, 100]) goes
down to the sampler.

Sampling parameters the body leaves unset are named in `GenerateRequest.unset_sampling`: the
tokenizer, which has the model directory, fills temperature / top_p / top_k / min_p /
repetition_penalty from the model's generation_config.json and, for chat, max_new_tokens with the
rest of the context (services/tokenizer/validate.py).

A body becomes `len(prompts) × n` GenerateRequests (choice index = prompt_index * n + j), each its
own rid `{id}-{index}`; with a `seed`, choice i samples with `seed + i` (distinct but reproducible).
Chat requests carry their messages to the tokenizer, which renders the model's chat template.

Chat's tools and both routes' output formats (services/gateway/tool_choice.py): the tool
definitions travel as `GenerateRequest.tools` for the tokenizer to render, a forced tool_choice or
a `response_format` / `regex` / `ebnf` / `json_schema` becomes the SamplingParams constraint, and
`OpenAIRequest.tools` tells the response side how to read the output (services/gateway/tool_calls.py).

Logprobs (chat `logprobs` + `top_logprobs`, completions `logprobs: k`) become /generate's
`return_logprob` + `top_logprobs_num`. Completions' `echo` with `logprobs`, or with a prompt of
token ids (the gateway has no tokenizer to spell it), also asks for the prompt's logprobs from
position 0, whose token bytes spell the echoed text.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from services.gateway.openai_fields import (
    ChatBody,
    CommonBody,
    CompletionBody,
    OpenAIError,
    check_unsupported,
)
from services.gateway.openai_logprobs import MAX_TOP_LOGPROBS
from services.gateway.request_body import InvalidRequest, check_encodable, convert, json_object, without_nulls
from services.gateway.tool_choice import NO_TOOLS, ToolPlan, dumps, output_constraint, plan_tools
from shared.messages import MODEL_SAMPLING_DEFAULTS, ChatMessage, GenerateRequest, SamplingParams, ToolCall

MAX_N = 64

Prompt = str | list[int] | list[ChatMessage]


def decode_body(raw: bytes, kind: type[Any]) -> Any:
    """`raw` as a `kind`, null fields (at any depth) dropped, unknown ones ignored; raises OpenAIError."""
    try:
        return convert(without_nulls(json_object(raw), deep=True), kind)
    except InvalidRequest as e:
        raise OpenAIError(str(e)) from None


def sampling_of(
    body: CommonBody, max_tokens: int | None, default_max: int | None, tools: ToolPlan = NO_TOOLS
) -> tuple[SamplingParams, list[str]]:
    """The sampling params of `body` and the names of those it leaves unset (the tokenizer fills
    them from the model). `default_max` None: max_new_tokens unset means the rest of the context."""
    if not 1 <= body.n <= MAX_N:
        raise OpenAIError(f"n must be between 1 and {MAX_N}", param="n")
    check_unsupported(body)
    constraint = output_constraint(body, tools)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():  # OpenAI's keys: token ids as strings
        if not key.isdigit():
            raise OpenAIError(f"logit_bias keys must be token ids, not {key!r}", param="logit_bias")
        bias[int(key)] = value
    given = {k: getattr(body, k) for k in MODEL_SAMPLING_DEFAULTS if getattr(body, k) is not None}
    unset = [k for k in MODEL_SAMPLING_DEFAULTS if k not in given]
    if max_tokens is None:
        max_tokens = default_max
    if max_tokens is None:  # up to the rest of the context: the tokenizer replaces this placeholder
        unset.append("max_new_tokens")
        max_tokens = max(SamplingParams().max_new_tokens, body.min_tokens)
    params = SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=body.min_tokens,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        seed=body.seed,
        logit_bias=bias,
        **given,
        **constraint,
    )
    problem = params.problem()
    if problem is not None:
        param = "logit_bias" if problem.startswith("logit_bias") else None
        raise OpenAIError(problem.replace("max_new_tokens", "max_tokens"), param=param)
    return params, unset


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
        calls = [ToolCall(id=c.id, name=c.function.name, arguments=_arguments(c.function.arguments))
                 for c in m.tool_calls or ()]
        if m.function_call is not None:  # legacy: one call, answered by a "function" message
            calls.append(ToolCall(name=m.function_call.name, arguments=_arguments(m.function_call.arguments)))
        if calls and m.role != "assistant":
            raise OpenAIError(f"messages[{i}]: only assistant messages make tool calls", param="messages")
        role = "tool" if m.role == "function" else m.role
        out.append(ChatMessage(role=role, content=content, name=m.name, tool_calls=calls, tool_call_id=m.tool_call_id))
    return out


def _arguments(arguments: str | dict[str, Any]) -> str:
    return arguments if isinstance(arguments, str) else dumps(arguments, "messages")



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
    tools: ToolPlan = NO_TOOLS  # chat: how to read each choice's output


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
        tools = plan_tools(body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        sampling, unset = sampling_of(body, max_tokens, None, tools)  # unset: up to the rest of the context
    else:
        body = decode_body(raw, CompletionBody)
        assert isinstance(body, CompletionBody)
        top = None if body.logprobs is None else check_top(body.logprobs, "logprobs")
        if body.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        prompts = completion_prompts(body)
        tools = NO_TOOLS
        sampling, unset = sampling_of(body, body.max_tokens, 16)  # OpenAI's default for completions

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
                    tools=tools.tools_json,
                    sampling=params,
                    stream=body.stream,
                    created=created,
                    return_logprob=top is not None or prompt_logprobs,
                    top_logprobs_num=top or 0,
                    logprob_start_len=0 if prompt_logprobs else -1,
                    unset_sampling=unset,
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
        tools=tools,
    )
