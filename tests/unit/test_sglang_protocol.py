"""SGLang's `/generate` request model: every GenerateReqInput / SamplingParams field, nulls,
unknown fields, batches, n, streamed batches and return_text_in_logprobs (fake bus)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from services.gateway.protocol import InvalidRequest, parse_generate, parse_generate_call
from shared.messages import FinishReason, GenerateRequest, RequestError, SamplingParams, TextOutput
from tests.unit import test_gateway
from tests.unit.test_gateway import Harness, assert_error, read_sse, step, wait_for

gw = test_gateway.gw  # fixtures: a gateway on a fake bus
make_gateway = test_gateway.make_gateway


def parse(body: dict[str, Any], **kw: Any) -> Any:
    return parse_generate_call(json.dumps(body).encode(), "gw", 1.0, **kw)


def finished(rid: str, text: str, ids: list[int], **kw: Any) -> TextOutput:
    length = FinishReason(type="length", length=len(ids))
    return step(rid, 0, text, ids, finish=length, full_text=text) if not kw else TextOutput(
        rid=rid, seq=0, text=text, new_ids=ids, prompt_tokens=3, completion_tokens=len(ids),
        finish=length, full_text=text, **kw,
    )


# --- the request model ------------------------------------------------------------------------


def test_null_means_the_default() -> None:
    nulls = {k: None for k in ("rid", "stream", "return_logprob", "top_logprobs_num", "logprob_start_len",
                               "routed_dp_rank", "data_parallel_rank", "lora_path", "image_data",
                               "return_hidden_states", "session_params", "model", "log_metrics")}
    sampling = {k: None for k in ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
                                  "stop_token_ids", "n", "regex", "json_schema", "ebnf", "no_stop_trim",
                                  "sampling_seed", "spaces_between_special_tokens", "skip_special_tokens")}
    call = parse({"text": "hi", "sampling_params": sampling, **nulls})
    (req,) = call.reqs
    assert not call.batch and not call.stream and call.ignored == []
    assert req.sampling == SamplingParams()
    assert req.return_logprob is False and req.top_logprobs_num == 0 and req.logprob_start_len == -1
    assert req.routed_dp_rank is None and len(req.rid) == 32


def test_sampling_params_as_sglang_names_them() -> None:
    sp = {"stop": "\n", "sampling_seed": 7, "max_new_tokens": 5, "min_new_tokens": 1, "top_k": 3,
          "stop_token_ids": [2], "ignore_eos": True, "skip_special_tokens": False,
          "spaces_between_special_tokens": False, "stream_interval": 4, "n": 1, "no_stop_trim": True}
    (req,) = parse({"text": "hi", "sampling_params": sp}).reqs
    s = req.sampling
    assert s.stop == ["\n"] and s.seed == 7 and s.max_new_tokens == 5 and s.min_new_tokens == 1
    assert s.top_k == 3 and s.stop_token_ids == [2] and s.ignore_eos and not s.skip_special_tokens and s.no_stop_trim
    assert parse({"text": "hi", "sampling_params": {"seed": 3, "sampling_seed": 3}}).reqs[0].sampling.seed == 3
    assert parse({"text": "hi", "sampling_params": {"logit_bias": {"5": -100}}}).reqs[0].sampling.logit_bias == {5: -100}


def test_fields_the_sglang_model_gateway_forwards_are_accepted() -> None:
    body = {"text": "hi", "model": "unknown", "sampling_params": {"max_new_tokens": 2}, "stream": False,
            "return_logprob": False, "return_text_in_logprobs": False, "log_metrics": True,
            "return_hidden_states": False, "background": False, "no_logs": False, "return_bytes": False,
            "return_entropy": False, "data_parallel_rank": 1, "rid": "smg-1", "priority": 0,
            "conversation_id": "c", "custom_labels": {"team": "a"}, "routing_key": "k", "session_id": "s"}
    call = parse(body)
    assert not call.batch and call.ignored == []
    assert call.reqs[0].routed_dp_rank == 1 and call.reqs[0].rid == "smg-1"
    # routed_dp_rank wins over its alias
    assert parse({"text": "hi", "routed_dp_rank": 0, "data_parallel_rank": 1}).reqs[0].routed_dp_rank == 0


@pytest.mark.parametrize(
    "body, feature",
    [
        ({"lora_path": "adapters/a"}, "LoRA"),
        ({"image_data": "http://x/cat.png"}, "multimodal input (image_data)"),
        ({"input_embeds": [[0.1]]}, "input_embeds"),
        ({"session_params": {"id": "s"}}, "sessions"),
        ({"return_hidden_states": True}, "hidden states"),
        ({"bootstrap_host": "10.0.0.1"}, "disaggregation"),
        ({"token_ids_logprob": [5]}, "token_ids_logprob"),
        ({"custom_logit_processor": "x"}, "custom logit processors"),
        ({"cache_salt": "tenant"}, "cache isolation"),
        ({"sampling_params": {"structural_tag": "{}"}}, "constrained decoding (structural_tag)"),
        ({"sampling_params": {"stop_regex": "x$"}}, "stop_regex"),
        ({"sampling_params": [{"max_new_tokens": 1}, {"custom_params": {"a": 1}}]}, "custom_params"),
    ],
)
async def test_a_feature_dpserve_lacks_is_400_naming_it(gw: Harness, body: dict[str, Any], feature: str) -> None:
    text: Any = ["a", "b"] if isinstance(body.get("sampling_params"), list) else "a"
    resp = await gw.client.post("/generate", json={"text": text} | body)
    assert resp.status == 400
    data = await resp.json()
    assert_error(data, 400, feature)
    assert "not supported" in data["error"]["message"]
    assert gw.bus.sent == []


def test_the_bodies_sglangs_frontend_sends_are_read_field_by_field() -> None:
    # sglang 0.5.10.post1's RuntimeEndpoint.generate (identical in 0.5.23): every sampling field, unset
    # ones at SGLang's defaults (stop_regex [], top_k -1), regex / json_schema null unless asked for
    gen = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 8,
           "min_new_tokens": 0, "n": 1, "stop": ["\n"], "stop_token_ids": [], "stop_regex": [],
           "temperature": 0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0,
           "presence_penalty": 0.0, "ignore_eos": False, "regex": "[0-9]+", "json_schema": None}
    call = parse({"text": "Q: hi\nA:", "sampling_params": gen, "return_logprob": True, "top_logprobs_num": 2})
    (req,) = call.reqs
    assert not call.batch and call.ignored == []
    s = req.sampling
    assert (s.max_new_tokens, s.stop, s.temperature, s.top_k, s.regex, s.json_schema) == (8, ["\n"], 0, -1, "[0-9]+", None)
    assert req.return_logprob and req.top_logprobs_num == 2 and req.logprob_start_len == -1
    # select: the shared prefix prefilled alone, then every choice scored in one batch
    (prefix,) = parse({"text": "The sky is", "sampling_params": {"max_new_tokens": 0}}).reqs
    assert prefix.sampling.max_new_tokens == 0 and not prefix.return_logprob
    scored = parse({"text": ["The sky is blue", "The sky is red"], "return_logprob": True,
                    "return_text_in_logprobs": True, "logprob_start_len": 2,
                    "sampling_params": {"max_new_tokens": 0, "temperature": 0}})
    assert scored.batch and scored.text_in_logprobs and len(scored.reqs) == 2
    assert all(r.return_logprob and r.logprob_start_len == 2 and r.sampling.max_new_tokens == 0 for r in scored.reqs)


def test_a_lacking_feature_at_its_default_is_accepted() -> None:
    body = {"text": "a", "lora_path": None, "image_data": [], "return_hidden_states": False,
            "routed_experts_start_len": 0, "sampling_params": {"regex": None, "no_stop_trim": False}}
    assert len(parse(body).reqs) == 1


@pytest.mark.parametrize(
    "body, contains",
    [
        ({"text": []}, "empty"),
        ({"input_ids": [[1], []]}, "empty"),
        ({"input_ids": [[1], 2]}, "mixes"),
        ({"input_ids": [1, [2]]}, "mixes"),
        ({"input_ids": [[1, -2]]}, ">= 0"),
        ({"text": ["a", "b"], "sampling_params": [{}]}, "1 entries for a batch of 2"),
        ({"text": ["a"], "sampling_params": [{"n": 2}, {"n": 1}]}, "entries"),
        ({"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 1}]}, "same `n`"),
        ({"text": "a", "sampling_params": {"n": 0}}, "n"),
        ({"text": "a", "n": 2, "sampling_params": {"n": 3}}, "differ"),
        ({"text": "a", "rid": ["x"]}, "not a batch"),
        ({"text": ["a", "b"], "rid": ["x"]}, "1 entries"),
        ({"text": ["a", "b"], "rid": ["x", "x"]}, "distinct"),
        ({"text": ["a", "b"], "return_logprob": [True]}, "1 entries"),
        ({"text": ["a"], "n": 2, "top_logprobs_num": [1]}, "cannot be a list"),
        ({"text": "a", "data_parallel_rank": -1}, "data_parallel_rank"),
        ({"text": "a", "sampling_params": {"seed": 1, "sampling_seed": 2}}, "differ"),
        ({"text": "a", "sampling_params": {"stop": ""}}, "stop"),
        ({"text": "a", "sampling_params": {"temperature": "hot"}}, "$.sampling_params.temperature"),
        ({"text": "a", "model": 5}, "$.model"),
        ({"text": "a", "sampling_params": {"logit_bias": {"x": 1.0}}}, "logit_bias"),
        ({"text": "a", "sampling_params": {"logit_bias": {"5": 101}}}, "logit_bias"),
    ],
)
async def test_bad_input_is_400_json(gw: Harness, body: dict[str, Any], contains: str) -> None:
    resp = await gw.client.post("/generate", json=body)
    assert resp.status == 400
    assert_error(await resp.json(), 400, contains)
    assert gw.bus.sent == []


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"null", b'{"text": "a", "top_logprobs_num": 1e400}'])
async def test_a_body_that_is_not_an_object_is_400(gw: Harness, raw: bytes) -> None:
    resp = await gw.client.post("/generate", data=raw)
    assert resp.status == 400
    assert_error(await resp.json(), 400)


def test_a_batch_past_the_queue_bound_is_refused_before_it_is_built() -> None:
    with pytest.raises(InvalidRequest, match="at most 8"):
        parse({"text": ["a"] * 3, "n": 3}, max_requests=8)
    with pytest.raises(InvalidRequest, match="at most"):
        parse({"text": "a", "sampling_params": {"n": 10**9}})


async def test_unknown_fields_are_ignored_and_counted(gw: Harness) -> None:
    body = {"text": "a", "rid": "u", "nucleus": 1, "temperature": 0.5}
    task = asyncio.create_task(gw.client.post("/generate", json=body))
    await gw.published("u")
    gw.feed(finished("u", "x", [1]))
    assert (await task).status == 200
    metrics = await (await gw.client.get("/metrics")).text()
    assert 'dpserve:ignored_request_fields_total{field="nucleus",' in metrics
    assert 'dpserve:ignored_request_fields_total{field="temperature",' in metrics
    gw.state.metrics.on_ignored_fields([f"f{i}" for i in range(500)])
    assert len(gw.state.metrics.ignored_fields) <= 101  # the client cannot grow the label set


# --- batches ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, prompts",
    [
        ({"text": ["a", "b"]}, [("a", None), ("b", None)]),
        ({"input_ids": [[1, 2], [3]]}, [(None, [1, 2]), (None, [3])]),
        ({"text": ["a"]}, [("a", None)]),  # a list of one is still a batch
    ],
)
def test_a_text_list_or_id_lists_is_a_batch(body: dict[str, Any], prompts: list[Any]) -> None:
    call = parse(body)
    assert call.batch
    assert [(r.text, r.input_ids) for r in call.reqs] == prompts
    with pytest.raises(InvalidRequest, match="batch"):
        parse_generate(json.dumps(body).encode(), "gw", 1.0)  # where one request is expected


async def test_a_batch_of_texts_is_a_list_in_order(gw: Harness) -> None:
    body = {"text": ["one", "two"], "rid": "b", "sampling_params": [{"max_new_tokens": 3}, {"max_new_tokens": 4}]}
    task = asyncio.create_task(gw.client.post("/generate", json=body))
    await gw.published("b_1")
    reqs = gw.bus.of(GenerateRequest)
    assert [(r.rid, r.text, r.sampling.max_new_tokens) for r in reqs] == [("b_0", "one", 3), ("b_1", "two", 4)]
    gw.feed(finished("b_1", "second", [2]))  # the last item finishes first
    gw.feed(finished("b_0", "first", [1]))
    resp = await task
    assert resp.status == 200
    data = await resp.json()
    assert [d["text"] for d in data] == ["first", "second"]
    assert [d["meta_info"]["id"] for d in data] == ["b_0", "b_1"]
    assert all("index" not in d for d in data)


async def test_a_batch_of_input_ids_with_rids_and_logprob_lists(gw: Harness) -> None:
    body = {"input_ids": [[1, 2], [3]], "rid": ["p", "q"], "return_logprob": [True, False], "top_logprobs_num": 2}
    task = asyncio.create_task(gw.client.post("/generate", json=body))
    await gw.published("q")
    reqs = gw.bus.of(GenerateRequest)
    assert [(r.rid, r.input_ids, r.return_logprob, r.top_logprobs_num) for r in reqs] == [
        ("p", [1, 2], True, 2), ("q", [3], False, 2)]
    gw.feed(finished("p", "a", [5]), finished("q", "b", [6]))
    data = await (await task).json()
    assert [d["output_ids"] for d in data] == [[5], [6]]


async def test_n_fans_out_each_prompt_consecutively(gw: Harness) -> None:
    body = {"text": ["a", "b"], "rid": "n", "sampling_params": {"n": 2, "max_new_tokens": 1}}
    task = asyncio.create_task(gw.client.post("/generate", json=body))
    await gw.published("n_3")
    reqs = gw.bus.of(GenerateRequest)
    assert [(r.rid, r.text) for r in reqs] == [("n_0", "a"), ("n_1", "a"), ("n_2", "b"), ("n_3", "b")]
    for k in (3, 1, 0, 2):
        gw.feed(finished(f"n_{k}", f"t{k}", [k]))
    data = await (await task).json()
    assert [d["text"] for d in data] == ["t0", "t1", "t2", "t3"]


async def test_top_level_n_makes_one_prompt_a_batch(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/generate", json={"text": "a", "n": 2}))
    await wait_for(lambda: len(gw.bus.of(GenerateRequest)) == 2)
    rids = [r.rid for r in gw.bus.of(GenerateRequest)]
    gw.feed(*(finished(r, "x", [1]) for r in rids))
    data = await (await task).json()
    assert isinstance(data, list) and [d["meta_info"]["id"] for d in data] == rids


async def test_a_failing_item_fails_the_batch_and_aborts_the_rest(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/generate", json={"text": ["a", "b"], "rid": "f"}))
    await gw.published("f_1")
    gw.feed(RequestError(rid="f_1", message="The input prompt is empty.", status=400))
    resp = await task
    assert resp.status == 400
    assert_error(await resp.json(), 400, "empty")
    await gw.state.drain()
    assert gw.aborts() == ["f_0"]
    assert len(gw.state.streams) == 0


async def test_a_streamed_batch_tags_events_by_index(gw: Harness) -> None:
    body = {"text": ["a", "b"], "rid": "s", "stream": True}
    async with asyncio.timeout(5):
        task = asyncio.create_task(gw.client.post("/generate", json=body))
        await gw.published("s_1")
        gw.feed(step("s_1", 0, "B", [20]))
        resp = await task
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        gw.feed(step("s_0", 0, "A", [10]))
        gw.feed(step("s_1", 1, "b", [21], finish=FinishReason(type="length", length=2), full_text="Bb"))
        gw.feed(step("s_0", 1, "a", [11], finish=FinishReason(type="length", length=2), full_text="Aa"))
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for e in events[:-1]:
        assert e["meta_info"]["id"] == f"s_{e['index']}"
        by_index[e["index"]].append(e)
    for index, text in ((0, "Aa"), (1, "Bb")):
        mine = by_index[index]
        assert mine[-1]["text"] == text and mine[-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert all(e["meta_info"]["finish_reason"] is None for e in mine[:-1])
        texts = [e["text"] for e in mine]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


async def test_a_single_stream_has_no_index(gw: Harness) -> None:
    async with asyncio.timeout(5):
        task = asyncio.create_task(gw.client.post("/generate", json={"text": "a", "rid": "one", "stream": True}))
        await gw.published("one")
        gw.feed(finished("one", "x", [1]))
        events = await read_sse(await task)
    assert events[-1] == "[DONE]" and all("index" not in e for e in events[:-1])


# --- return_text_in_logprobs --------------------------------------------------------------------


@pytest.mark.parametrize("with_text", [False, True])
async def test_return_text_in_logprobs_puts_the_token_text_third(gw: Harness, with_text: bool) -> None:
    body = {"text": "a", "rid": "lp", "return_logprob": True, "top_logprobs_num": 1, "logprob_start_len": 0,
            "return_text_in_logprobs": with_text}
    task = asyncio.create_task(gw.client.post("/generate", json=body))
    await gw.published("lp")
    gw.feed(finished(
        "lp", "é", [7],
        input_token_logprobs=[(None, 3)],
        output_token_logprobs=[(-0.5, 7)],
        output_top_logprobs=[[(-0.5, 7)]],
        token_bytes={3: b"a", 7: "é".encode()[:1]},  # half a character: U+FFFD, as a one-token decode
    ))
    meta = (await (await task).json())["meta_info"]
    if with_text:
        assert meta["input_token_logprobs"] == [[None, 3, "a"]]
        assert meta["output_token_logprobs"] == [[-0.5, 7, "\ufffd"]]
        assert meta["output_top_logprobs"] == [[[-0.5, 7, "\ufffd"]]]
    else:
        assert meta["output_token_logprobs"] == [[-0.5, 7, None]]
