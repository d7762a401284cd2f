"""OpenAI tool calling and output formats: reading calls out of the model's text (whole and
streamed, split at every boundary), rendering tools into chat templates with and without tool
support, the forced schema of `required` / named choices, the constraint a body asks for, the
400s, and the gateway's answers (message.tool_calls, delta.tool_calls chunks)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jinja2
import jsonschema_rs
import msgspec
import pytest

from services.gateway.openai_fields import ChatBody, OpenAIError
from services.gateway.openai_protocol import parse_openai
from services.gateway.tool_calls import ForcedReader, ParsedCall, Read, TaggedReader, read_whole
from services.gateway.tool_choice import ToolPlan, output_constraint, plan_tools
from services.tokenizer.tokenize import TextTokenizer, _jinja_env
from services.tokenizer.tools import render_chat, text_inputs
from services.tokenizer.validate import validate
from shared.messages import ChatMessage, GenerateRequest, TokenizedRequest, ToolCall
from tests.unit.test_gateway import Harness, make_gateway, read_sse  # noqa: F401 (fixture)
from tests.unit.test_openai import feed, out, published

NAMES = frozenset({"get_weather", "add"})
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def tagged(text: str) -> Read:
    return read_whole(TaggedReader(NAMES, ids()), text)


def block(name: str, args: Any) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


# --- reading tagged calls -------------------------------------------------------------------------


def test_one_call_becomes_a_tool_call_and_no_content() -> None:
    got = tagged(block("get_weather", {"city": "Paris"}))
    assert got.calls == [ParsedCall("call_0", "get_weather", '{"city": "Paris"}')]
    assert got.content == ""
    assert got.calls[0].openai() == {
        "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }


def test_several_calls_with_text_around_them() -> None:
    text = "Let me check.\n" + block("get_weather", {"city": "Oslo"}) + "\n" + block("add", {"a": 1, "b": 2}) + "\nDone."
    got = tagged(text)
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("get_weather", {"city": "Oslo"}),
                                                                       ("add", {"a": 1, "b": 2})]
    assert [c.id for c in got.calls] == ["call_0", "call_1"]
    assert got.content == "Let me check.Done."  # whitespace adjoining a block goes with it


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": }\n</tool_call>",  # malformed JSON
        block("launch_rockets", {"n": 1}),  # a function that was not offered
        block("get_weather", [1, 2]),  # arguments not an object
        "<tool_call>[1]</tool_call>",
        '<tool_call>{"name": "add", "arguments": "not json"}</tool_call>',
    ],
)
def test_a_block_that_is_no_valid_call_stays_text(bad: str) -> None:
    text = "before \n" + bad + " after"
    got = tagged(text)
    assert got.calls == [] and got.content == text


def test_text_without_blocks_is_unchanged() -> None:
    for text in ["", "plain answer", "  spaced  \n", "a <tool_ maybe", "x <tool_call", "<tool_call>{\"name\":"]:
        got = tagged(text)
        assert got.calls == [] and got.content == text


def test_arguments_as_json_text_or_missing_and_an_unclosed_last_block() -> None:
    got = tagged('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
                 '<tool_call>{"name": "get_weather"}')
    assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [("add", {"a": 1, "b": 2}), ("get_weather", {})]
    assert got.content == ""


def _streamed(text: str, cuts: list[int]) -> tuple[list[Read], Read]:
    reader = TaggedReader(NAMES, ids())
    bounds = [0, *cuts, len(text)]
    reads = [reader.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    reads.append(reader.finish())
    total = Read()
    for r in reads:
        total += r
    return reads, total


STREAM_TEXTS = [
    "Sure.\n" + block("get_weather", {"city": "Köln"}) + "\nand " + block("add", {"a": 1, "b": 2}),
    "no calls here <tool_ but a lookalike <tool_call>{broken</tool_call> end",
    block("get_weather", {"city": "x"}),
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_split_at_every_boundary_reads_as_the_whole_text(text: str) -> None:
    whole = tagged(text)
    for cut in range(len(text) + 1):
        reads, total = _streamed(text, [cut])
        assert (total.content, total.calls) == (whole.content, whole.calls), cut
    reads, total = _streamed(text, list(range(1, len(text))))  # one character a delta
    assert (total.content, total.calls) == (whole.content, whole.calls)


def test_streaming_holds_back_only_a_possible_tag_and_sends_a_call_once_closed() -> None:
    reader = TaggedReader(NAMES, ids())
    assert reader.feed("Hello <tool").content == "Hello"  # " <tool" may start a block
    assert reader.feed("box> there").content == " <toolbox> there"
    assert reader.feed("\n<tool_call>\n{\"name\": \"add\", ").content == ""
    got = reader.feed('"arguments": {"a": 1, "b": 2}}\n</tool_call>\nok')
    assert [c.name for c in got.calls] == ["add"] and got.content == "ok"
    assert reader.finish() == Read()


def test_forced_reader_reads_the_json_array_or_leaves_text() -> None:
    text = '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    reader = ForcedReader(NAMES, ids())
    assert reader.feed(text[:10]) == Read()
    got = reader.feed(text[10:]) + reader.finish()
    assert [(c.id, c.name) for c in got.calls] == [("call_0", "get_weather"), ("call_1", "add")]
    assert got.content == ""
    for cut_short in ('[{"name": "add", "argu', "[]", '[{"name": "nope", "arguments": {}}]'):
        assert read_whole(ForcedReader(NAMES, ids()), cut_short) == Read(content=cut_short)


# --- rendering -------------------------------------------------------------------------------------

CHATML = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
NO_TOOL_ROLE = (
    "{%- for m in messages %}{%- if m['role'] not in ('system', 'user', 'assistant') %}"
    "{{- raise_exception('roles are system, user and assistant') }}{%- endif %}"
    "[{{ m['role'] }}]{{ m['content'] }}{%- endfor %}"
)
WITH_TOOLS = (
    "{%- if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{%- for m in messages %}[{{ m.role }}]{{ m.content }}"
    "{%- for c in m.tool_calls or [] %}<call {{ c.id }} {{ c.function.name }} {{ c.function.arguments.city }}>"
    "{%- endfor %}{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{%- endfor %}"
)


class Template:
    """A chat template alone, rendered as TextTokenizer renders it."""

    def __init__(self, source: str) -> None:
        self.chat_template = source
        self._template = _jinja_env().from_string(source)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


HISTORY = [
    ChatMessage(role="user", content="weather in Paris?"),
    ChatMessage(role="assistant", tool_calls=[ToolCall(id="call_7", name="get_weather", arguments='{"city": "Paris"}')]),
    ChatMessage(role="tool", content="21 C", tool_call_id="call_7"),
    ChatMessage(role="tool", content="sunny", tool_call_id="call_7"),
]


def test_a_template_without_tools_gets_them_as_a_hermes_system_message() -> None:
    prompt = render_chat(Template(CHATML), HISTORY, [WEATHER])
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in system
    assert "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>" in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<|im_start|>tool\n21 C<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_arguments_that_are_no_json_object_render_as_text() -> None:
    for arguments in ("[" * 5000, "not json", "[1]"):
        msgs = [ChatMessage(role="assistant", tool_calls=[ToolCall(name="f", arguments=arguments)])]
        assert json.dumps(arguments) in render_chat(Template(CHATML), msgs, None)
        assert render_chat(Template(WITH_TOOLS), msgs, None).startswith("[assistant]<call  f >")


def test_the_tools_prompt_joins_a_leading_system_message() -> None:
    msgs = text_inputs([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="hi")], [ADD])
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and json.dumps(ADD) in msgs[0]["content"]


def test_tool_results_become_a_user_turn_when_the_template_refuses_the_tool_role() -> None:
    prompt = render_chat(Template(NO_TOOL_ROLE), HISTORY, None)
    assert "[tool]" not in prompt
    assert "[user]<tool_response>\n21 C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>" in prompt
    with pytest.raises(jinja2.TemplateError):  # other refusals stay refusals
        render_chat(Template(NO_TOOL_ROLE), [ChatMessage(role="robot", content="x")], None)


def test_a_template_with_tools_gets_them_as_hugging_face_passes_them() -> None:
    prompt = render_chat(Template(WITH_TOOLS), HISTORY, [WEATHER, ADD])
    assert prompt == ("<tools>get_weather;add;</tools>[user]weather in Paris?[assistant]<call call_7 get_weather Paris>"
                      "[tool]21 C(call_7)[tool]sunny(call_7)")


def test_validate_renders_tools_with_the_tiny_models_template(tiny_model: Path) -> None:
    tok = TextTokenizer(str(tiny_model))
    req = GenerateRequest(rid="r", gateway_id="g", messages=HISTORY, tools=json.dumps([WEATHER]))
    got = validate(req, tok)
    assert isinstance(got, TokenizedRequest)
    prompt = tok.decode(got.input_ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n# Tools") and json.dumps(WEATHER) in prompt
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    bad = validate(msgspec.structs.replace(req, tools='{"not": "a list"}'), tok)
    assert not isinstance(bad, TokenizedRequest) and "tools must be a list" in bad.message


# --- request side: plans, schemas, constraints, refusals ----------------------------------------


def chat_body(**fields: Any) -> ChatBody:
    return msgspec.convert({"messages": MESSAGES} | fields, ChatBody)


def test_auto_is_the_default_with_tools_and_none_renders_nothing() -> None:
    plan = plan_tools(chat_body(tools=[WEATHER, ADD]))
    assert plan.read == "tagged" and plan.names == NAMES and plan.json_schema is None
    assert json.loads(plan.tools_json or "") == [WEATHER, ADD]
    assert plan_tools(chat_body(tools=[WEATHER], tool_choice="none")) == ToolPlan(None, frozenset(), None, None)
    assert plan_tools(chat_body()).read is None
    legacy = plan_tools(chat_body(functions=[WEATHER["function"]], function_call={"name": "get_weather"}))
    assert legacy.read == "forced" and legacy.names == {"get_weather"}


def _calls_validator(plan: ToolPlan) -> Any:
    return jsonschema_rs.validator_for(json.loads(plan.json_schema or ""))


def test_required_forces_an_array_of_calls_to_any_tool() -> None:
    plan = plan_tools(chat_body(tools=[WEATHER, ADD], tool_choice="required"))
    assert plan.read == "forced"
    v = _calls_validator(plan)
    assert v.is_valid([{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "get_weather", "arguments": {"city": "Rome"}}])
    for bad in ([], [{"name": "add", "arguments": {"a": 1}}], [{"name": "get_weather", "arguments": {"city": "x" * 13}}],
                [{"name": "nope", "arguments": {}}], {"name": "add", "arguments": {"a": 1, "b": 2}}):
        assert not v.is_valid(bad), bad
    one = _calls_validator(plan_tools(chat_body(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)))
    call = {"name": "add", "arguments": {"a": 1, "b": 2}}
    assert one.is_valid([call]) and not one.is_valid([call, call])


def test_a_named_choice_forces_one_call_to_that_tool_and_defs_move_to_the_root() -> None:
    tool = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"when": {"$ref": "#/$defs/Date"}}, "required": ["when"],
        "$defs": {"Date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}}}}
    plan = plan_tools(chat_body(tools=[WEATHER, tool], tool_choice={"type": "function", "function": {"name": "book"}}))
    schema = json.loads(plan.json_schema or "")
    assert schema["$defs"] == {"Date": tool["function"]["parameters"]["$defs"]["Date"]}  # type: ignore[index]
    v = jsonschema_rs.validator_for(schema)
    assert v.is_valid([{"name": "book", "arguments": {"when": "2024-01-02"}}])
    assert not v.is_valid([{"name": "book", "arguments": {"when": "tomorrow"}}])
    assert not v.is_valid([{"name": "get_weather", "arguments": {"city": "Rome"}}])
    assert schema["maxItems"] == 1


@pytest.mark.parametrize(
    ("fields", "param", "contains"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice", "'add'"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice", "needs tools"),
        ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call", "'g'"),
        ({"tools": [WEATHER], "functions": [{"name": "f"}]}, "functions", "not both"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "'bad name'"),
        ({"tools": [ADD, ADD]}, "tools", "unique"),
        ({"tools": [{"function": {"name": "f", "parameters": {"$defs": [1]}}}], "tool_choice": "required"}, "tools",
         "$defs must be an object"),
    ],
)
def test_tool_fields_that_do_not_fit_are_400_naming_them(fields: dict[str, Any], param: str, contains: str) -> None:
    with pytest.raises(OpenAIError) as e:
        plan_tools(chat_body(**fields))
    assert e.value.status == 400 and e.value.param == param and contains in e.value.message


def test_response_format_and_sglang_constraints_become_one_sampling_constraint() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert output_constraint(chat_body(response_format={"type": "text"})) == {}
    assert output_constraint(chat_body(response_format={"type": "json_object"})) == {"json_schema": '{"type": "object"}'}
    got = output_constraint(chat_body(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}))
    assert json.loads(got["json_schema"]) == schema
    assert output_constraint(chat_body(regex="[ab]+")) == {"regex": "[ab]+"}
    assert output_constraint(chat_body(ebnf='root ::= "a"')) == {"ebnf": 'root ::= "a"'}
    assert output_constraint(chat_body(json_schema='{"type": "string"}')) == {"json_schema": '{"type": "string"}'}


@pytest.mark.parametrize(
    ("fields", "param", "contains"),
    [
        ({"response_format": {"type": "json_object"}, "regex": "a"}, "regex", "at most one"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
         "at most one"),
        ({"regex": "a", "ebnf": "root ::= \"a\""}, "ebnf", "at most one"),
        ({"response_format": {"type": "grammar"}}, "response_format", "'grammar'"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        ({"json_schema": "{not json"}, "json_schema", "not valid JSON"),
    ],
)
def test_output_formats_that_do_not_fit_are_400_naming_them(fields: dict[str, Any], param: str, contains: str) -> None:
    with pytest.raises(OpenAIError) as e:
        output_constraint(body := chat_body(**fields), plan_tools(body))
    assert e.value.status == 400 and e.value.param == param and contains in e.value.message


def test_a_body_becomes_requests_with_tools_history_and_the_constraint() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "20 C"},
            {"role": "assistant", "function_call": {"name": "add", "arguments": {"a": 1, "b": 2}}},
            {"role": "function", "name": "add", "content": "3"},
        ],
        "tools": [WEATHER, ADD],
        "tool_choice": "required",
    }
    parsed = parse_openai(json.dumps(body).encode(), True, "gw", 0.0)
    (req,) = parsed.reqs
    assert req.messages is not None and [m.role for m in req.messages] == ["user", "assistant", "tool", "assistant", "tool"]
    assert req.messages[1].tool_calls == [ToolCall(id="call_1", name="get_weather", arguments='{"city": "Rome"}')]
    assert req.messages[1].content == "" and req.messages[2].tool_call_id == "call_1"
    assert req.messages[3].tool_calls == [ToolCall(name="add", arguments='{"a": 1, "b": 2}')]
    assert json.loads(req.tools or "") == [WEATHER, ADD]
    assert req.sampling.json_schema == parsed.tools.json_schema and parsed.tools.read == "forced"
    completion = parse_openai(json.dumps({"prompt": "a", "regex": "[0-9]+"}).encode(), False, "gw", 0.0)
    assert completion.reqs[0].sampling.regex == "[0-9]+" and completion.reqs[0].tools is None


# --- the gateway's answers ----------------------------------------------------------------------


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> AsyncIterator[Harness]:  # noqa: F811
    yield await make_gateway()


async def test_chat_answers_tool_calls_and_finish_reason_tool_calls(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post(CHAT, json={"messages": MESSAGES, "tools": [WEATHER], "rid": "t"}))
    (req,) = await published(gw, 1)
    assert json.loads(req.tools or "") == [WEATHER]
    feed(gw, out("t-0", 0, "ok " + block("get_weather", {"city": "Paris"}), [5], "stop"))
    resp = await task
    assert resp.status == 200, await resp.text()
    (choice,) = (await resp.json())["choices"]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["message"]["content"] == "ok"


async def test_chat_without_a_call_answers_text(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post(CHAT, json={"messages": MESSAGES, "tools": [WEATHER], "rid": "p"}))
    await published(gw, 1)
    feed(gw, out("p-0", 0, "It is sunny <tool_call>{oops}</tool_call>", [5], "stop"))
    (choice,) = (await (await task).json())["choices"]
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "It is sunny <tool_call>{oops}</tool_call>"


async def test_streamed_tool_calls_are_delta_tool_calls_chunks(gw: Harness) -> None:
    body = {"messages": MESSAGES, "tools": [WEATHER, ADD], "rid": "s", "stream": True}
    task = asyncio.create_task(gw.client.post(CHAT, json=body))
    await published(gw, 1)
    text = "Hi " + block("get_weather", {"city": "Oslo"}) + block("add", {"a": 1, "b": 2})
    pieces = [text[:5], text[5:20], text[20:60], text[60:]]
    for seq, piece in enumerate(pieces):
        feed(gw, out("s-0", seq, piece, [5], "stop" if seq == len(pieces) - 1 else None))
    resp = await task
    assert resp.status == 200
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    content = "".join(c["delta"].get("content") or "" for c in chunks)
    calls = [tc for c in chunks for tc in c["delta"].get("tool_calls", [])]
    assert content == "Hi"
    assert [(tc["index"], tc["type"], tc["function"]["name"], json.loads(tc["function"]["arguments"])) for tc in calls] == [
        (0, "function", "get_weather", {"city": "Oslo"}), (1, "function", "add", {"a": 1, "b": 2})]
    assert all(tc["id"].startswith("call_") for tc in calls)
    assert [c["finish_reason"] for c in chunks].count("tool_calls") == 1
    assert chunks[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}


async def test_forced_choice_reads_the_json_array_streamed_and_whole(gw: Harness) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    text = '[{"name": "add", "arguments": {"a": 2, "b": 3}}]'
    task = asyncio.create_task(gw.client.post(CHAT, json={"messages": MESSAGES, "tools": [WEATHER, ADD],
                                                          "tool_choice": named, "rid": "f"}))
    (req,) = await published(gw, 1)
    assert jsonschema_rs.validator_for(json.loads(req.sampling.json_schema or "")).is_valid(json.loads(text))
    feed(gw, out("f-0", 0, text, [5], "stop"))
    (choice,) = (await (await task).json())["choices"]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}

    body = {"messages": MESSAGES, "tools": [ADD], "tool_choice": "required", "rid": "fs", "stream": True}
    task = asyncio.create_task(gw.client.post(CHAT, json=body))
    await gw.published("fs-0")
    feed(gw, out("fs-0", 0, text[:9], [5]), out("fs-0", 1, text[9:], [6], "stop"))
    events = await read_sse(await task)
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == ""
    assert [tc["function"]["name"] for c in chunks for tc in c["delta"].get("tool_calls", [])] == ["add"]
    assert chunks[-1]["finish_reason"] == "tool_calls"

