"""Chat messages and tool definitions -> the variables a chat template renders. Pure.

A template that names `tools` (Qwen2.5, Llama 3.1, Hermes, ...) gets them as Hugging Face passes
them: the `tools` variable, assistant messages with `tool_calls` (`function.arguments` a dict when
it is a JSON object, as HF templates expect) and `role: "tool"` messages with `tool_call_id`.

A template that does not (SmolLM2, the tiny test model's ChatML) gets everything as text in the
Hermes / Qwen convention, which services/gateway/tool_calls.py parses back:
- the tool definitions become a system message (appended to the first one when there is one):
  JSON lines inside `<tools></tools>` and the instruction to answer a call as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- an assistant message's earlier calls are written in that same form after its content;
- tool results stay `role: "tool"` turns; `render_chat` falls back to one user turn per run of
  tool messages, each result inside `<tool_response></tool_response>`, when the template refuses
  the tool role.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import jinja2

from shared.messages import ChatMessage, ToolCall

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

TOOLS_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class ChatTemplate(Protocol):
    chat_template: str | None

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str: ...


def template_takes_tools(source: str | None) -> bool:
    return source is not None and "tools" in source


def parse_tools(tools_json: str | None) -> list[dict[str, Any]] | None:
    """GenerateRequest.tools as a list of tool definitions; ValueError when it is not one."""
    if tools_json is None:
        return None
    try:
        tools = json.loads(tools_json)
    except RecursionError:
        raise ValueError("tools are nested too deeply") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of objects")
    return tools


def arguments_value(arguments: str) -> Any:
    """A call's arguments as templates want them: the object its JSON text holds, else the text."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments
    return value if isinstance(value, dict) else arguments


def tool_call_text(call: ToolCall) -> str:
    args = arguments_value(call.arguments)
    args_json = json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else json.dumps(args)
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(call.name, ensure_ascii=False)}, "arguments": {args_json}}}\n{TOOL_CALL_CLOSE}'


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    return TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def native_inputs(
    messages: list[ChatMessage], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for a template that renders tools itself."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments_value(c.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out, ({"tools": tools} if tools else {})


def text_inputs(
    messages: list[ChatMessage], tools: list[dict[str, Any]] | None, tool_as_user: bool = False
) -> list[dict[str, Any]]:
    """Messages for a template that knows nothing of tools: tools, calls and results as text.
    `tool_as_user`: tool results as user turns of `<tool_response>` blocks, not the tool role."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool" and tool_as_user:
            response = f"<tool_response>\n{m.content}\n</tool_response>"
            if out and out[-1].get("tool_responses"):  # a run of results: one user turn
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_responses": True})
            continue
        content = m.content
        if m.tool_calls:
            calls = "\n".join(tool_call_text(c) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    for d in out:
        d.pop("tool_responses", None)
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            first = out[0]
            out[0] = first | {"content": f"{first['content']}\n\n{prompt}" if first["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def render_chat(tok: ChatTemplate, messages: list[ChatMessage], tools: list[dict[str, Any]] | None) -> str:
    """The prompt text of `messages` (and `tools`) under `tok`'s chat template; raises what
    `apply_chat_template` raises (ValueError: no template, jinja2.TemplateError: refused), and
    ValueError for input nested too deeply to render."""
    try:
        return _render(tok, messages, tools)
    except RecursionError:
        raise ValueError("the messages or tools are nested too deeply") from None


def _render(tok: ChatTemplate, messages: list[ChatMessage], tools: list[dict[str, Any]] | None) -> str:
    if template_takes_tools(tok.chat_template):
        inputs, variables = native_inputs(messages, tools)
        return tok.apply_chat_template(inputs, **variables)
    try:
        return tok.apply_chat_template(text_inputs(messages, tools))
    except jinja2.TemplateError:
        if not any(m.role == "tool" for m in messages):
            raise
    return tok.apply_chat_template(text_inputs(messages, tools, tool_as_user=True))
