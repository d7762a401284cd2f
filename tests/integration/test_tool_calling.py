"""OpenAI tool calling and response_format through the official `openai` client against a real
`dpserve serve` of the tiny random model: a `required` / named tool_choice forces its (random)
output into a call whose arguments validate against the tool's schema, streamed and not; the
tool's result goes back as an assistant message with tool_calls plus a tool message;
`chat.completions.parse` with a pydantic model returns the parsed object."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import jsonschema_rs
import openai
import pydantic
import pytest

WEATHER_PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": WEATHER_PARAMS}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"enum": [1, 2, 3]}, "b": {"type": "boolean"}}, "required": ["a", "b"]}}}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "add": ADD["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server_factory: Callable[..., Any]) -> openai.OpenAI:
    server = server_factory()
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS
    jsonschema_rs.validate(SCHEMAS[name], json.loads(arguments))


def test_required_call_and_the_tool_result_round_trip(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                         max_tokens=96, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls or []
    assert calls and choice.message.content is None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)

    history = [*ASK, choice.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": c.id, "content": "21 C, sunny"} for c in calls]
    answer = client.chat.completions.create(model="m", messages=history, tools=[WEATHER, ADD], max_tokens=6, seed=1)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].message.tool_calls is None


def test_named_choice_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m", messages=ASK, tools=[WEATHER, ADD], stream=True, max_tokens=96, seed=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                got = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                got["name"] += (tc.function and tc.function.name) or ""
                got["arguments"] += (tc.function and tc.function.arguments) or ""
            reasons.append(c.finish_reason)
    assert [r for r in reasons if r] == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    check_call("get_weather", calls[0]["arguments"])


class Forecast(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=10)
    sky: Literal["sunny", "cloudy"]
    windy: bool


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    out = client.chat.completions.parse(model="m", messages=ASK, response_format=Forecast, max_tokens=64, seed=3)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Forecast), out.choices[0].message.content
    assert len(parsed.city) <= 10


def test_a_named_choice_that_is_no_tool_and_parameters_that_do_not_compile_are_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "add"}})
    assert "'add'" in str(e.value) and e.value.status_code == 400
    broken = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}, "required": ["x"]}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, tools=[broken], tool_choice="required", max_tokens=4)
    assert "Missing" in str(e.value)
