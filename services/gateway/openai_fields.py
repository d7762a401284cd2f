"""OpenAI's request bodies (`/v1/completions`, `/v1/chat/completions`), field by field, with
SGLang's / vLLM's extensions, and the error a body is refused with.

Every field is optional but `prompt` / `messages`; unknown fields are ignored and null means the
default (services/gateway/request_body.py). Chat's `tools` / `tool_choice` / `parallel_tool_calls`
(and the legacy `functions` / `function_call`), and both routes' `response_format` and SGLang's
`regex` / `ebnf` / `json_schema`, are read by services/gateway/tool_choice.py. `best_of` other
than 1 or n is refused by `check_unsupported` with a 400 naming it; fields without effect here
(`user`, `store`, `metadata`, `service_tier`, ...) are accepted. `suffix` is refused by the
completions parser.
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


class FunctionCallBody(Struct, kw_only=True):
    name: str
    arguments: str | dict[str, Any] = "{}"  # JSON text (OpenAI's); an object is taken as well


class ToolCallBody(Struct, kw_only=True):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallBody


class ChatMessageBody(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None  # assistant: the calls it made
    function_call: FunctionCallBody | None = None  # assistant, legacy: the one call it made
    tool_call_id: str | None = None  # tool: the call this answers


class FunctionDef(Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None


class ToolDef(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(Struct, kw_only=True):
    name: str


class NamedToolChoice(Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: FunctionName


class JsonSchemaFormat(Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(Struct, kw_only=True):
    type: str  # "text" | "json_object" | "json_schema"
    json_schema: JsonSchemaFormat | None = None


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
    # an output constraint (at most one): services/gateway/tool_choice.py
    response_format: ResponseFormat | None = None
    # SGLang / vLLM extensions
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None  # a JSON Schema as JSON text
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
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[FunctionDef] | None = None  # legacy: read as tools
    function_call: Literal["none", "auto"] | FunctionName | None = None  # legacy: read as tool_choice
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def check_unsupported(body: CommonBody) -> None:
    """400 naming a field OpenAI has and dpserve does not implement, set to a non-default value."""

    def refuse(param: str, what: str) -> OpenAIError:
        return OpenAIError(f"{what} is not supported by this server", param=param)

    if body.best_of is not None and body.best_of not in (1, body.n):
        raise refuse("best_of", "best_of other than 1 or n")
