"""OpenAI compatibility of the gateway: OpenAI's fields as OpenAI reads them (null means the
default, unknown fields ignored, unimplemented features refused by name, logit_bias down to the
sampler), the model's sampling
defaults and the rest of the context as chat's max_tokens (filled by the tokenizer), `finish_reason`
"abort", `/v1/models/{id}`, `GET /flush_cache`, CORS, and `/tokenize` / `/detokenize` over the
tokenizer's request/reply subjects."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from services.scheduler.request import Req
from services.scheduler.sampler import sample
from services.tokenizer.service import detokenize_query, tokenize_query
from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.validate import validate
from shared.messages import (
    ChatMessage,
    DetokenizeQuery,
    FlushCache,
    GenerateRequest,
    SamplingParams,
    TokenizedRequest,
    TokenizeQuery,
)
from shared.subjects import Subjects
from tests.unit.test_gateway import Harness, make_gateway, read_sse  # noqa: F401 (fixture)
from tests.unit.test_openai import feed, out, published

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> AsyncIterator[Harness]:  # noqa: F811
    yield await make_gateway()


def assert_openai_error(body: dict[str, Any], status: int, param: str | None = None, contains: str = "") -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status, err
    assert err["param"] == param, err
    assert contains in err["message"], err


# --- OpenAI's fields ----------------------------------------------------------------------------


async def test_openai_fields_nulls_and_unknown_fields_are_accepted(gw: Harness) -> None:
    body = {
        "messages": MESSAGES,
        "rid": "x",
        "n": 2,
        "best_of": 2,
        "user": "u-1",
        "service_tier": "auto",
        "store": False,
        "metadata": {"team": "a"},
        "seed": 3,
        "stream_options": None,
        "parallel_tool_calls": True,
        "logit_bias": {},
        "tools": None,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "temperature": None,
        "top_p": None,
        "stop": None,
        "presence_penalty": None,
        "logprobs": None,
        "some_future_field": {"x": 1},
    }
    task = asyncio.create_task(gw.client.post(CHAT, json=body))
    reqs = await published(gw, 2)
    assert [r.sampling.seed for r in reqs] == [3, 4]
    assert reqs[0].sampling.temperature == 1.0 and reqs[0].sampling.top_p == 1.0  # placeholders
    assert set(reqs[0].unset_sampling) == {"temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                           "max_new_tokens"}
    feed(gw, out("x-0", 0, "a", [4], "stop"), out("x-1", 0, "b", [5], "stop"))
    resp = await task
    assert resp.status == 200, await resp.text()
    assert [c["message"]["content"] for c in (await resp.json())["choices"]] == ["a", "b"]


async def test_given_sampling_params_are_not_left_to_the_model(gw: Harness) -> None:
    body = {"messages": MESSAGES, "temperature": 0.5, "top_k": 4, "max_completion_tokens": 9, "rid": "g"}
    task = asyncio.create_task(gw.client.post(CHAT, json=body))
    (req,) = await published(gw, 1)
    assert req.sampling.temperature == 0.5 and req.sampling.top_k == 4 and req.sampling.max_new_tokens == 9
    assert set(req.unset_sampling) == {"top_p", "min_p", "repetition_penalty"}
    feed(gw, out("g-0", 0, "a", [4], "length"))
    assert (await task).status == 200


async def test_completions_keep_openai_default_of_16_tokens(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/v1/completions", json={"prompt": "a", "max_tokens": None}))
    (req,) = await published(gw, 1)
    assert req.sampling.max_new_tokens == 16 and "max_new_tokens" not in req.unset_sampling
    feed(gw, out(req.rid, 0, "x", [9], "length"))
    assert (await task).status == 200


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"best_of": 3}, "best_of"),  # tools and response_format: tests/unit/test_tool_calls.py
    ],
)
async def test_unimplemented_features_are_refused_by_name(gw: Harness, extra: dict[str, Any], param: str) -> None:
    resp = await gw.client.post(CHAT, json={"messages": MESSAGES} | extra)
    assert resp.status == 400
    assert_openai_error(await resp.json(), 400, param, "not supported")
    assert not gw.bus.of(GenerateRequest)


async def test_logit_bias_reaches_the_sampler_params(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post(CHAT, json={"messages": MESSAGES, "rid": "lb", "logit_bias": {"5": -100, "7": 2.5}}))
    (req,) = await published(gw, 1)
    assert req.sampling.logit_bias == {5: -100.0, 7: 2.5}
    feed(gw, out("lb-0", 0, "a", [4], "stop"))
    assert (await task).status == 200


@pytest.mark.parametrize("bias", [{"a": 1}, {"-1": 1}, {"5": 101}])
async def test_bad_logit_bias_is_400(gw: Harness, bias: dict[str, float]) -> None:
    resp = await gw.client.post(CHAT, json={"messages": MESSAGES, "logit_bias": bias})
    assert resp.status == 400
    assert_openai_error(await resp.json(), 400, "logit_bias", "logit_bias")


def test_sampler_adds_logit_bias() -> None:
    logits = torch.zeros(2, 8)
    logits[:, 3] = 5.0
    reqs = [
        Req(rid=f"r{i}", gateway_id="g", input_ids=[1], sampling=SamplingParams(temperature=0.0, logit_bias=b))
        for i, b in enumerate([{3: -100.0, 6: 1.0, 99: 100.0}, {}])
    ]
    assert sample(logits, reqs, [[], []]).tokens == [6, 3]  # id 99 is beyond this model's rows: skipped


def test_validate_refuses_logit_bias_outside_the_vocabulary(tok_with_defaults: TextTokenizer) -> None:
    sampling = SamplingParams(logit_bias={tok_with_defaults.vocab_size: 1.0})
    got = validate(GenerateRequest(rid="r", gateway_id="g", text="a", sampling=sampling), tok_with_defaults)
    assert not isinstance(got, TokenizedRequest) and "logit_bias" in got.message


@pytest.mark.parametrize(
    ("body", "contains"),
    [
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": MESSAGES, "user": 5}, "user"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ([1, 2], "JSON object"),
    ],
)
async def test_field_validation_errors_stay_400_in_openai_shape(gw: Harness, body: Any, contains: str) -> None:
    resp = await gw.client.post(CHAT, json=body)
    assert resp.status == 400
    assert_openai_error(await resp.json(), 400, None, contains)


# --- the tokenizer fills what the request left unset -------------------------------------------


@pytest.fixture(scope="module")
def tok_with_defaults(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    d = tmp_path_factory.mktemp("gen-defaults")
    for f in tiny_model.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, d / f.name)
    config = json.loads((d / "generation_config.json").read_text())
    config |= {"temperature": 0.6, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}
    (d / "generation_config.json").write_text(json.dumps(config))
    return TextTokenizer(str(d))


def test_tokenizer_reads_sampling_defaults(tok_with_defaults: TextTokenizer) -> None:
    assert tok_with_defaults.sampling_defaults == {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": -1,  # HF's 0: disabled
        "repetition_penalty": 1.1,
    }


def test_validate_fills_only_unset_params_and_the_rest_of_the_context(tok_with_defaults: TextTokenizer) -> None:
    req = GenerateRequest(
        rid="r",
        gateway_id="g",
        messages=[ChatMessage(role="user", content="hello")],
        sampling=SamplingParams(temperature=0.2, max_new_tokens=128),
        unset_sampling=["top_p", "top_k", "min_p", "max_new_tokens"],
    )
    got = validate(req, tok_with_defaults)
    assert isinstance(got, TokenizedRequest)
    s = got.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (0.2, 0.9, -1, 0.0, 1.0)
    assert s.max_new_tokens == tok_with_defaults.context_length - len(got.input_ids)


def test_validate_keeps_given_params_when_nothing_is_unset(tok_with_defaults: TextTokenizer) -> None:
    req = GenerateRequest(rid="r", gateway_id="g", text="hello", sampling=SamplingParams(max_new_tokens=5))
    got = validate(req, tok_with_defaults)
    assert isinstance(got, TokenizedRequest)
    assert got.sampling == SamplingParams(max_new_tokens=5)


def test_validate_rejects_min_tokens_beyond_the_rest_of_the_context(tok_with_defaults: TextTokenizer) -> None:
    n = tok_with_defaults.context_length
    req = GenerateRequest(
        rid="r",
        gateway_id="g",
        input_ids=[5] * (n - 2),
        sampling=SamplingParams(min_new_tokens=4, max_new_tokens=128),
        unset_sampling=["max_new_tokens"],
    )
    got = validate(req, tok_with_defaults)
    assert not isinstance(got, TokenizedRequest) and "maximum context length" in got.message


# --- finish_reason "abort" ---------------------------------------------------------------------


async def test_an_aborted_choice_reports_abort(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/v1/completions", json={"prompt": "a", "rid": "ab"}))
    await published(gw, 1)
    feed(gw, out("ab-0", 0, "x", [4], "abort"))
    assert (await (await task).json())["choices"][0]["finish_reason"] == "abort"


async def test_an_aborted_streamed_choice_reports_abort(gw: Harness) -> None:
    body = {"messages": MESSAGES, "rid": "sa", "stream": True}
    task = asyncio.create_task(gw.client.post(CHAT, json=body))
    await published(gw, 1)
    feed(gw, out("sa-0", 0, "x", [4], "abort"))
    events = await read_sse(await task)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "abort"


# --- /v1/models/{id}, GET /flush_cache, CORS ----------------------------------------------------


async def test_model_by_id(make_gateway: Callable[..., Any]) -> None:  # noqa: F811
    gw = await make_gateway(served_model_name="org/tiny")
    resp = await gw.client.get("/v1/models/org/tiny")
    assert resp.status == 200
    assert (await resp.json()) | {"created": 0} == {"id": "org/tiny", "object": "model", "created": 0,
                                                    "owned_by": "dpserve"}
    resp = await gw.client.get("/v1/models/other")
    assert resp.status == 404
    assert_openai_error(await resp.json(), 404, "model", "other")


async def test_flush_cache_answers_get_too(gw: Harness) -> None:
    resp = await gw.client.get("/flush_cache")
    assert resp.status == 200
    assert len(gw.bus.of(FlushCache)) == 1


async def test_cors_preflight_needs_no_api_key_and_every_answer_allows_any_origin(
    make_gateway: Callable[..., Any],  # noqa: F811
) -> None:
    gw = await make_gateway(api_key="secret")
    headers = {
        "Origin": "http://page.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    resp = await gw.client.options(CHAT, headers=headers)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    refused = await gw.client.get("/v1/models", headers={"Origin": "http://page.example"})
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_header_on_a_stream(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post(CHAT, json={"messages": MESSAGES, "rid": "c", "stream": True}))
    await published(gw, 1)
    feed(gw, out("c-0", 0, "x", [4], "stop"))
    resp = await task
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    await read_sse(resp)


# --- /tokenize, /detokenize ---------------------------------------------------------------------


class TokenizerRequester:
    """The tokenizer service's request/reply handlers, answered in process."""

    def __init__(self, tok: TextTokenizer) -> None:
        self.tok, self.subjects = tok, Subjects()

    async def request(self, subject: str, msg: Any, kind: type, timeout: float) -> Any:
        if subject == self.subjects.tokenize_text:
            assert isinstance(msg, TokenizeQuery)
            return tokenize_query(msg, self.tok)
        assert subject == self.subjects.detokenize_ids and isinstance(msg, DetokenizeQuery)
        return detokenize_query(msg, self.tok)


@pytest.fixture
async def tgw(make_gateway: Callable[..., Any], tiny_model: Path) -> Harness:  # noqa: F811
    return await make_gateway(requester=TokenizerRequester(TextTokenizer(str(tiny_model))))


async def test_tokenize_and_detokenize_round_trip(tgw: Harness, tiny_model: Path) -> None:
    tok = TextTokenizer(str(tiny_model))
    resp = await tgw.client.post("/tokenize", json={"prompt": "hello world", "model": "m"})
    assert resp.status == 200
    body = await resp.json()
    assert body == {"tokens": tok.encode("hello world"), "count": len(tok.encode("hello world")),
                    "max_model_len": tok.context_length}
    resp = await tgw.client.post("/v1/tokenize", json={"prompt": ["a", "b c"], "add_special_tokens": False})
    many = await resp.json()
    assert many["count"] == [len(t) for t in many["tokens"]] and len(many["tokens"]) == 2
    resp = await tgw.client.post("/detokenize", json={"tokens": body["tokens"]})
    assert (await resp.json()) == {"text": tok.decode(body["tokens"])}
    resp = await tgw.client.post("/v1/detokenize", json={"tokens": many["tokens"]})
    assert (await resp.json())["text"] == [tok.decode(t) for t in many["tokens"]]


async def test_detokenize_refuses_ids_outside_the_vocabulary(tgw: Harness) -> None:
    resp = await tgw.client.post("/detokenize", json={"tokens": [1, 10**9]})
    assert resp.status == 400
    assert_openai_error(await resp.json(), 400, "tokens", "outside the vocabulary")


async def test_tokenize_without_a_tokenizer_is_503(gw: Harness) -> None:
    resp = await gw.client.post("/tokenize", json={"prompt": "a"})
    assert resp.status == 503
    resp = await gw.client.post("/tokenize", json={"text": "a"})
    assert resp.status == 400


def test_nulls_inside_json_schemas_are_data_not_defaults() -> None:
    """A body's nulls mean "the default" except inside a JSON Schema (response_format's `schema`,
    a tool's `parameters`), where `"enum": [..., null]` must reach the grammar as written."""
    from services.gateway.openai_fields import ChatBody
    from services.gateway.openai_protocol import decode_body
    from services.gateway.tool_choice import output_constraint, plan_tools

    schema = {"type": "object", "properties": {"x": {"enum": ["a", None]}, "y": {"const": None}}, "required": ["x"]}
    body = decode_body(json.dumps({
        "messages": [{"role": "user", "content": "hi", "name": None}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": None}},
        "temperature": None,
    }).encode(), ChatBody)
    assert json.loads(output_constraint(body, plan_tools(body))["json_schema"]) == schema
    params = {"type": "object", "properties": {"v": {"enum": [None, 1]}}}
    body = decode_body(json.dumps({
        "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": params, "description": None}}],
    }).encode(), ChatBody)
    forced = json.loads(output_constraint(body, plan_tools(body))["json_schema"])
    assert _find(forced, "v") == {"enum": [None, 1]}


def _find(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        if key in node.get("properties", {}):
            return node["properties"][key]
        return next((f for v in node.values() if (f := _find(v, key)) is not None), None)
    if isinstance(node, list):
        return next((f for v in node if (f := _find(v, key)) is not None), None)
    return None
