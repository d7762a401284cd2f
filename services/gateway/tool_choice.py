"""What an OpenAI body's tools and output formats ask of a generation. Pure.

`plan_tools(body)` reads chat's `tools`, `tool_choice`, `parallel_tool_calls` (and the legacy
`functions` / `function_call`, read as the same) into a `ToolPlan`:

    tool_choice          rendered tools   output read as (services/gateway/tool_calls.py)
    none, or no tools    none             plain text
    auto (the default)   all              text with `<tool_call>` blocks ("tagged")
    required             all              a JSON array of calls, forced by `json_schema` ("forced")
    {"function": name}   all              a JSON array of one call to `name`, forced the same way

The forced schema is an array (minItems 1; maxItems 1 for a named choice or
`parallel_tool_calls: false`) of `{"name": <const>, "arguments": <that tool's parameters>}`, one
`anyOf` branch per tool; `$defs` of the tools' parameters move to the root, where their
`#/$defs/...` references point.

`output_constraint(body, plan)` is the one `SamplingParams` constraint of a body: the forced
schema, `response_format` (`json_object` -> `{"type": "object"}`, `json_schema` -> its schema;
`text` -> none) or SGLang's top-level `json_schema` / `regex` / `ebnf`. Two at once is a 400.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.gateway.openai_fields import (
    ChatBody,
    CommonBody,
    FunctionDef,
    FunctionName,
    NamedToolChoice,
    OpenAIError,
)

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    tools_json: str | None  # GenerateRequest.tools: the definitions the template renders
    names: frozenset[str]  # functions a call may name
    read: str | None  # None: plain text; "tagged" or "forced" (see the module docstring)
    json_schema: str | None  # "forced": the array-of-calls schema


NO_TOOLS = ToolPlan(None, frozenset(), None, None)


def plan_tools(body: ChatBody) -> ToolPlan:
    """Raises OpenAIError (400) naming the field at fault."""
    if body.tools is not None and body.functions is not None:
        raise OpenAIError("give tools or functions, not both", param="functions")
    legacy = body.functions is not None
    functions = [t.function for t in body.tools or ()] if not legacy else list(body.functions or ())
    param = "functions" if legacy else "tools"
    names = [f.name for f in functions]
    bad = next((n for n in names if not FUNCTION_NAME.fullmatch(n)), None)
    if bad is not None:
        raise OpenAIError(f"function name {bad!r} must be 1-64 letters, digits, _ or -", param=param)
    if len(set(names)) < len(names):
        raise OpenAIError("function names must be unique", param=param)

    choice_param = "function_call" if legacy else "tool_choice"
    raw = body.function_call if legacy else body.tool_choice
    choice, named = (raw or "auto", None) if raw is None or isinstance(raw, str) else (None, _name(raw))
    if choice == "none" or (choice == "auto" and not functions):
        return NO_TOOLS
    if not functions:
        raise OpenAIError(f"{choice_param} {choice or named!r} needs {param}", param=choice_param)
    if named is not None and named not in names:
        raise OpenAIError(f"{choice_param} names function {named!r}, which is not among the {param}", param=choice_param)

    tools_json = dumps([{"type": "function", "function": _definition(f)} for f in functions], param)
    if choice == "auto":
        return ToolPlan(tools_json, frozenset(names), "tagged", None)
    chosen = [f for f in functions if named is None or f.name == named]
    schema = calls_schema(chosen, one=named is not None or not body.parallel_tool_calls)
    return ToolPlan(tools_json, frozenset(names), "forced", dumps(schema, param))


def dumps(value: Any, param: str) -> str:
    """`value` (decoded from the body) as JSON text; nesting too deep for `json` is a 400."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except RecursionError:
        raise OpenAIError(f"{param} is nested too deeply", param=param) from None


def _name(choice: NamedToolChoice | FunctionName) -> str:
    return choice.function.name if isinstance(choice, NamedToolChoice) else choice.name


def _definition(f: FunctionDef) -> dict[str, Any]:
    out: dict[str, Any] = {"name": f.name}
    if f.description is not None:
        out["description"] = f.description
    out["parameters"] = f.parameters if f.parameters is not None else NO_ARGUMENTS
    return out


def calls_schema(functions: list[FunctionDef], one: bool) -> dict[str, Any]:
    """The JSON Schema of a non-empty array of calls to `functions` (at most one when `one`)."""
    defs: dict[str, Any] = {}
    branches = []
    for f in functions:
        params = dict(f.parameters) if f.parameters is not None else NO_ARGUMENTS
        for key in ("$defs", "definitions"):
            moved = params.pop(key, None) or {}
            if not isinstance(moved, dict):
                raise OpenAIError(f"{f.name}: parameters' {key} must be an object", param="tools")
            for name, sub in moved.items():
                if defs.setdefault(f"{key}/{name}", sub) != sub:
                    raise OpenAIError(f"tools define {key} {name!r} differently", param="tools")
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "items": branches[0] if len(branches) == 1 else {"anyOf": branches}}
    schema["minItems"] = 1
    if one:
        schema["maxItems"] = 1
    for path, sub in defs.items():
        key, name = path.split("/", 1)
        schema.setdefault(key, {})[name] = sub
    return schema


def output_constraint(body: CommonBody, plan: ToolPlan = NO_TOOLS) -> dict[str, str]:
    """The body's output constraint as SamplingParams fields: {} or one of json_schema / regex /
    ebnf. Raises OpenAIError naming the field at fault, or the second of two constraints."""
    found: list[tuple[str, str, str]] = []  # (param, SamplingParams field, source)
    if plan.json_schema is not None:
        found.append(("tool_choice", "json_schema", plan.json_schema))
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            found.append(("response_format", "json_schema", '{"type": "object"}'))
        elif fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema is None:
                raise OpenAIError("response_format json_schema needs json_schema.schema", param="response_format")
            found.append(("response_format", "json_schema", dumps(fmt.json_schema.schema, "response_format")))
        else:
            raise OpenAIError(f"response_format type {fmt.type!r} is not supported (text, json_object, json_schema)",
                              param="response_format")
    if body.json_schema is not None:
        try:
            schema = json.loads(body.json_schema)
        except ValueError:
            raise OpenAIError("json_schema is not valid JSON", param="json_schema") from None
        if not isinstance(schema, dict | bool):
            raise OpenAIError("json_schema must be a JSON Schema (an object)", param="json_schema")
        found.append(("json_schema", "json_schema", body.json_schema))
    for kind in ("regex", "ebnf"):
        source = getattr(body, kind)
        if source is not None:
            found.append((kind, kind, source))
    if len(found) > 1:
        first, second = found[0][0], found[1][0]
        raise OpenAIError(f"{second} and {first} both constrain the output; give at most one", param=second)
    return {field: source for _, field, source in found}
