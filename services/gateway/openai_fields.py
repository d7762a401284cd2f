"""OpenAI's request bodies (`/v1/completions`, `/v1/chat/completions`), field by field, with
SGLang's / vLLM's extensions, and the error a body is refused with.

Every field is optional but `prompt` / `messages`; unknown fields are ignored and null means the
default (services/gateway/request_body.py). Fields dpserve does not implement (`tools`,
`functions`, `tool_choice`, `function_call`, `response_format` other than text, `best_of` other
than 1 or n) are refused by `check_unsupported` with a 400 naming them when set to anything but
their default; fields without effect here (`user`, `store`, `metadata`, `service_tier`,
`parallel_tool_calls`, ...) are accepted. `suffix` is refused by the completions parser.
"""

from __future__ import annotations

from typing import Any, Literal

from msgspec import Struct


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param = message, status, param


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ContentPart(Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageBody(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class CommonBody(Struct, kw_only=True):
    """Fields both endpoints share: OpenAI's, then SGLang's extensions."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: the model's default (generation_config.json), else 1
    top_p: float | None = None
    n: int = 1
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # accepted, without effect here
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # not implemented: refused unless default
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # SGLang / vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    rid: str | None = None


class CompletionBody(CommonBody, kw_only=True):
    prompt: str | list[str | int | list[int]]  # a text, ids, or a batch of texts / id lists
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(CommonBody, kw_only=True):
    messages: list[ChatMessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def check_unsupported(body: CommonBody) -> None:
    """400 naming a field OpenAI has and dpserve does not implement, set to a non-default value."""

    def refuse(param: str, what: str) -> OpenAIError:
        return OpenAIError(f"{what} is not supported by this server", param=param)

    if body.best_of is not None and body.best_of not in (1, body.n):
        raise refuse("best_of", "best_of other than 1 or n")
    if body.tools or body.functions:
        raise refuse("tools" if body.tools else "functions", "tool calling")
    for param, choice in (("tool_choice", body.tool_choice), ("function_call", body.function_call)):
        if choice not in (None, "none", "auto"):  # "auto" without tools calls none
            raise refuse(param, "tool calling")
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise refuse("response_format", f"response_format {body.response_format.get('type')!r}")
