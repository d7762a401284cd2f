"""OpenAI routes, SGLang routes and /metrics of the gateway, with the fake bus of test_gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from tokenizers import Tokenizer

from services.detokenizer.batch import detokenize_one
from services.detokenizer.incremental import IncrementalDecoder
from services.gateway.metrics import GatewayMetrics
from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.validate import validate
from shared.messages import (
    Abort,
    ChatMessage,
    FinishReason,
    FlushCache,
    GenerateRequest,
    LoadReport,
    RequestError,
    TextBatch,
    TextOutput,
    TokenizedRequest,
    TokenOutput,
)
from shared.metrics import Histogram, MetricsSnapshot, Sample, render
from tests.unit.test_gateway import Harness, make_gateway, read_sse, wait_for  # noqa: F401 (fixture)


def out(rid: str, seq: int, text: str, ids: list[int], finish: str | None = None, prompt: int = 3) -> TextOutput:
    return TextOutput(
        rid=rid,
        seq=seq,
        text=text,
        new_ids=ids,
        prompt_tokens=prompt,
        completion_tokens=seq + 1,
        finish=FinishReason(type=finish) if finish else None,
    )


async def published(gw: Harness, count: int) -> list[GenerateRequest]:
    await wait_for(lambda: len(gw.bus.of(GenerateRequest)) >= count)
    return sorted(gw.bus.of(GenerateRequest), key=lambda r: r.rid)


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> AsyncIterator[Harness]:  # noqa: F811
    yield await make_gateway()


def feed(gw: Harness, *outs: TextOutput | RequestError) -> None:
    batch = TextBatch(outputs=list(outs))
    gw.state.metrics.observe(batch)
    gw.state.streams.feed(batch)


# --- /v1/completions --------------------------------------------------------------------------


async def test_completion_fans_out_n_with_distinct_seeds(gw: Harness) -> None:
    body = {"prompt": "Hello", "n": 2, "seed": 7, "max_tokens": 5, "stop": "\n", "temperature": 0.5, "rid": "r"}
    task = asyncio.create_task(gw.client.post("/v1/completions", json=body))
    reqs = await published(gw, 2)
    assert [r.rid for r in reqs] == ["r-0", "r-1"]
    assert [r.sampling.seed for r in reqs] == [7, 8]
    assert all(r.text == "Hello" and r.sampling.max_new_tokens == 5 and r.sampling.stop == ["\n"] for r in reqs)
    assert all(r.sampling.temperature == 0.5 for r in reqs)
    feed(gw, out("r-1", 0, " b", [5], "length"), out("r-0", 0, " a", [4]), out("r-0", 1, "a", [4], "stop"))
    resp = await task
    assert resp.status == 200
    data = await resp.json()
    assert data["id"] == "cmpl-r" and data["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in data["choices"]] == [
        (0, " aa", "stop"),
        (1, " b", "length"),
    ]
    assert data["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_completion_token_prompt_and_default_max_tokens(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/v1/completions", json={"prompt": [1, 2, 3]}))
    (req,) = await published(gw, 1)
    assert req.input_ids == [1, 2, 3] and req.text is None
    assert req.sampling.max_new_tokens == 16  # OpenAI's default for completions
    feed(gw, out(req.rid, 0, "x", [9], "length"))
    assert (await (await task).json())["choices"][0]["text"] == "x"


@pytest.mark.parametrize(
    ("path", "body", "contains"),
    [
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs must be between 0 and 20"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "requires logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": -1},
            "top_logprobs must be between 0 and 20",
        ),
        ("/v1/completions", {"prompt": "a", "n": 0}, "n must be"),
        ("/v1/completions", {"prompt": "a", "best_of": 3}, "best_of"),  # unknown fields are ignored
        ("/v1/completions", {"prompt": "a", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": ""}, "empty"),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "a"}]}, "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "image_url",
        ),
    ],
)
async def test_bad_requests_get_openai_errors(gw: Harness, path: str, body: dict[str, Any], contains: str) -> None:
    resp = await gw.client.post(path, json=body)
    assert resp.status == 400
    err = (await resp.json())["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert contains in err["message"], err
    assert not gw.bus.of(GenerateRequest)


async def test_pipeline_error_answers_in_openai_shape_and_aborts_siblings(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/v1/completions", json={"prompt": "a", "n": 2, "rid": "e"}))
    await published(gw, 2)
    feed(gw, RequestError(rid="e-1", message="prompt too long", status=400))
    resp = await task
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "prompt too long"
    await gw.state.drain()
    assert gw.aborts() == ["e-0"]  # the unfinished sibling is freed
    assert len(gw.state.streams) == 0


# --- /v1/chat/completions ---------------------------------------------------------------------


async def test_chat_sends_messages_to_the_tokenizer(gw: Harness) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ],
        "max_tokens": 9,
        "max_completion_tokens": 4,
        "presence_penalty": 0.5,
    }
    task = asyncio.create_task(gw.client.post("/v1/chat/completions", json=body))
    (req,) = await published(gw, 1)
    assert req.messages == [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi there")]
    assert req.sampling.max_new_tokens == 4 and req.sampling.presence_penalty == 0.5
    feed(gw, out(req.rid, 0, "ok", [1], "stop"))
    data = await (await task).json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert data["choices"][0]["finish_reason"] == "stop"


async def test_chat_stream_chunks_and_usage(gw: Harness) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": {"include_usage": True}}
    resp_task = asyncio.create_task(gw.client.post("/v1/chat/completions", json=body))
    (req,) = await published(gw, 1)
    feed(gw, out(req.rid, 0, "Hel", [1]))
    resp = await resp_task
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    feed(gw, out(req.rid, 1, "lo", [2]), out(req.rid, 2, "!", [3], "length"))
    events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == "Hello!"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


async def test_completion_stream_never_shows_stop_string(gw: Harness) -> None:
    body = {"prompt": "x", "stream": True, "stop": ["END"]}
    resp_task = asyncio.create_task(gw.client.post("/v1/completions", json=body))
    (req,) = await published(gw, 1)
    feed(gw, out(req.rid, 0, "abcE", [1]))
    resp = await resp_task
    feed(gw, TextOutput(rid=req.rid, seq=1, text="ND", new_ids=[2], prompt_tokens=3, completion_tokens=2,
                        finish=FinishReason(type="stop", matched="END"), full_text="abc"))
    events = await read_sse(resp)
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == "abc"
    assert "usage" not in events[0]


# --- logprobs ---------------------------------------------------------------------------------

# token 1 = "Hi", token 2 = the first byte of "é" (alone: U+FFFD), token 3 = "!"
TOKEN_BYTES = {1: b"Hi", 2: "é".encode()[:1], 3: b"!"}


def lp_out(rid: str, seq: int, text: str, steps: list[tuple[float, int]], top: list[list[tuple[float, int]]] | None,
           finish: str | None = None) -> TextOutput:
    o = out(rid, seq, text, [t for _, t in steps], finish)
    o.output_token_logprobs = steps
    o.output_top_logprobs = top
    o.token_bytes = {t: TOKEN_BYTES[t] for row in [steps, *(top or [])] for _, t in row}
    return o


async def test_chat_logprobs_whole(gw: Harness) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2}
    task = asyncio.create_task(gw.client.post("/v1/chat/completions", json=body))
    (req,) = await published(gw, 1)
    assert req.return_logprob and req.top_logprobs_num == 2 and req.logprob_start_len == -1
    feed(gw, lp_out(req.rid, 0, "Hi", [(-0.5, 1)], [[(-0.5, 1), (-1.5, 3)]]),
         lp_out(req.rid, 1, "", [(-0.25, 2)], [[(-0.25, 2), (-2.0, 1)]], "length"))
    data = await (await task).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert [(e["token"], e["logprob"], e["bytes"]) for e in content] == [
        ("Hi", -0.5, [72, 105]),
        ("\ufffd", -0.25, [0xC3]),  # a partial character: the text is replaced, the bytes exact
    ]
    assert content[0]["top_logprobs"] == [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
        {"token": "!", "logprob": -1.5, "bytes": [33]},
    ]
    assert [t["token"] for t in content[1]["top_logprobs"]] == ["\ufffd", "Hi"]


async def test_no_logprobs_unless_asked(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/v1/completions", json={"prompt": "x"}))
    (req,) = await published(gw, 1)
    assert not req.return_logprob and req.top_logprobs_num == 0
    feed(gw, out(req.rid, 0, "y", [1], "length"))
    assert (await (await task).json())["choices"][0]["logprobs"] is None


async def test_completion_logprobs_stream_per_chunk(gw: Harness) -> None:
    body = {"prompt": "x", "logprobs": 1, "stream": True}
    resp_task = asyncio.create_task(gw.client.post("/v1/completions", json=body))
    (req,) = await published(gw, 1)
    assert req.return_logprob and req.top_logprobs_num == 1
    feed(gw, lp_out(req.rid, 0, "Hi", [(-0.5, 1)], [[(-0.5, 1)]]))
    resp = await resp_task
    feed(gw, lp_out(req.rid, 1, "!", [(-0.1, 3)], [[(-0.1, 3)]]))
    feed(gw, lp_out(req.rid, 2, "!!", [(-0.2, 3), (-0.3, 3)], [[(-0.2, 3)], [(-0.3, 3)]], "length"))
    events = await read_sse(resp)
    chunks = [e["choices"][0] for e in events[:-1]]
    # every chunk's logprobs cover exactly the tokens of its own text
    for c in chunks:
        if c["logprobs"] is not None:
            assert "".join(c["logprobs"]["tokens"]) == c["text"]
    merged: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in merged:
            merged[key] += c["logprobs"][key] if c["logprobs"] else []
    assert merged == {
        "tokens": ["Hi", "!", "!", "!"],
        "token_logprobs": [-0.5, -0.1, -0.2, -0.3],
        "top_logprobs": [{"Hi": -0.5}, {"!": -0.1}, {"!": -0.2}, {"!": -0.3}],
        "text_offset": [0, 2, 3, 4],
    }
    assert "".join(c["text"] for c in chunks) == "Hi!!!"


async def test_chat_logprobs_stream_and_top_zero(gw: Harness) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "stream": True}
    resp_task = asyncio.create_task(gw.client.post("/v1/chat/completions", json=body))
    (req,) = await published(gw, 1)
    assert req.return_logprob and req.top_logprobs_num == 0
    feed(gw, lp_out(req.rid, 0, "Hi", [(-0.5, 1)], None))
    resp = await resp_task
    feed(gw, lp_out(req.rid, 1, "!", [(-0.1, 3)], None, "stop"))
    events = await read_sse(resp)
    entries = [e for ev in events[:-1] if (lp := ev["choices"][0]["logprobs"]) for e in lp["content"]]
    assert [(e["token"], e["logprob"], e["top_logprobs"]) for e in entries] == [("Hi", -0.5, []), ("!", -0.1, [])]


def with_prompt(o: TextOutput, prompt: list[tuple[float | None, int]], top: list[list[tuple[float, int]]]) -> TextOutput:
    """`o` as the first output of a request that asked for its prompt's logprobs."""
    o.input_token_logprobs = prompt
    o.input_top_logprobs = top
    o.token_bytes = (o.token_bytes or {}) | {t: TOKEN_BYTES[t] for row in [prompt, *top] for _, t in row}
    return o


async def test_echo_with_logprobs_scores_the_prompt(gw: Harness) -> None:
    """An eval harness's loglikelihood call: echo + logprobs + max_tokens 0."""
    body = {"prompt": "Hi!Hi", "logprobs": 1, "echo": True, "max_tokens": 0}
    task = asyncio.create_task(gw.client.post("/v1/completions", json=body))
    (req,) = await published(gw, 1)
    assert req.return_logprob and req.logprob_start_len == 0 and req.sampling.max_new_tokens == 0
    first = lp_out(req.rid, 0, "", [], None, "length")
    feed(gw, with_prompt(first, [(None, 1), (-2.0, 3), (-0.5, 1)], [[], [(-1.0, 1)], [(-0.5, 1)]]))
    choice = (await (await task).json())["choices"][0]
    assert choice["text"] == "Hi!Hi"
    assert choice["logprobs"] == {
        "tokens": ["Hi", "!", "Hi"],
        "token_logprobs": [None, -2.0, -0.5],
        "top_logprobs": [None, {"Hi": -1.0}, {"Hi": -0.5}],
        "text_offset": [0, 2, 3],
    }


async def test_echo_of_a_token_prompt_with_generated_logprobs(gw: Harness) -> None:
    """A prompt of token ids is echoed from its tokens' bytes; the generated entries follow."""
    body = {"prompt": [1, 3], "logprobs": 0, "echo": True, "max_tokens": 1}
    task = asyncio.create_task(gw.client.post("/v1/completions", json=body))
    (req,) = await published(gw, 1)
    assert req.input_ids == [1, 3] and req.logprob_start_len == 0
    first = lp_out(req.rid, 0, "Hi", [(-0.25, 1)], [[]], "length")
    feed(gw, with_prompt(first, [(None, 1), (-3.0, 3)], [[], []]))
    choice = (await (await task).json())["choices"][0]
    assert choice["text"] == "Hi!Hi"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["Hi", "!", "Hi"] and lp["token_logprobs"] == [None, -3.0, -0.25]
    assert lp["text_offset"] == [0, 2, 3]


async def test_echo_without_logprobs_streams_the_prompt_first(gw: Harness) -> None:
    for prompt, wants_prompt_logprobs in (("Hi", False), ([1, 3], True)):
        body = {"prompt": prompt, "echo": True, "stream": True, "max_tokens": 2}
        task = asyncio.create_task(gw.client.post("/v1/completions", json=body))
        (req,) = [r for r in await published(gw, 1) if r.input_ids == (prompt if isinstance(prompt, list) else None)]
        gw.bus.sent.clear()
        # a token-id prompt needs its tokens' bytes to be echoed: the gateway asks for them
        assert req.return_logprob == wants_prompt_logprobs and req.top_logprobs_num == 0
        first = out(req.rid, 0, "!", [3])
        if wants_prompt_logprobs:
            first = with_prompt(first, [(None, 1), (-3.0, 3)], [])
        feed(gw, first)
        resp = await task
        feed(gw, out(req.rid, 1, "!", [3], "length"))
        events = await read_sse(resp)
        chunks = [e["choices"][0] for e in events[:-1]]
        assert chunks[0]["text"] == ("Hi!" if prompt == "Hi" else "Hi!!")  # the prompt leads the first chunk
        assert "".join(c["text"] for c in chunks) == chunks[0]["text"] + "!"
        assert all(c["logprobs"] is None for c in chunks)


def test_detokenizer_attaches_token_bytes_for_logprobs(tiny_model: Any) -> None:
    decoder = IncrementalDecoder(tiny_model / "tokenizer.json")
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    ids = tok.encode("hello world").ids
    base = {"rid": "d", "gateway_id": "g", "seq": 0, "ids": ids, "num_new": len(ids), "prompt_tokens": 1,
            "completion_tokens": len(ids)}
    plain = detokenize_one(TokenOutput(**base), decoder)
    assert plain.token_bytes is None
    got = detokenize_one(TokenOutput(**base, output_token_logprobs=[(-1.0, i) for i in ids],
                                     output_top_logprobs=[[(-0.5, 0)] for _ in ids]), decoder)
    assert got.token_bytes is not None and set(got.token_bytes) == {*ids, 0}
    assert b"".join(got.token_bytes[i] for i in ids).decode() == tok.decode(ids)


# --- SGLang routes ----------------------------------------------------------------------------


async def test_flush_and_abort_publish_control_messages(gw: Harness) -> None:
    assert (await gw.client.post("/flush_cache")).status == 200
    assert any(isinstance(m, FlushCache) for _, m in gw.bus.sent)
    task = asyncio.create_task(gw.client.post("/v1/completions", json={"prompt": "a", "n": 2, "rid": "q"}))
    await published(gw, 2)
    resp = await gw.client.post("/abort_request", json={"rid": "q"})
    assert sorted((await resp.json())["aborted"]) == ["q", "q-0", "q-1"]
    assert {"q-0", "q-1"} <= {m.rid for m in gw.bus.of(Abort)}
    bad = await gw.client.post("/abort_request", json={})
    assert bad.status == 400
    feed(gw, out("q-0", 0, "", [], "abort"), out("q-1", 0, "", [], "abort"))
    assert (await task).status == 200


async def test_server_info_lists_each_rank(gw: Harness) -> None:
    for rank, total in ((0, 100), (1, 200)):
        report = LoadReport(dp_rank=rank, seq=1, timestamp=0, holding_tokens=5, num_running=1, num_waiting=2,
                            kv_used=10, kv_total=total)
        await gw.state.liveness.on_report(report)
        await gw.state.metrics.on_report(report)
    info = await (await gw.client.get("/get_server_info")).json()
    assert [(s["dp_rank"], s["max_total_num_tokens"]) for s in info["internal_states"]] == [(0, 100), (1, 200)]
    assert info["dp_size"] == 1 and info["load_balance_method"] == gw.state.args.load_balance_method
    assert (await (await gw.client.get("/get_model_info")).json())["is_generation"] is True


async def test_health_generate_runs_one_token(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.get("/health_generate"))
    (req,) = await published(gw, 1)
    assert req.sampling.max_new_tokens == 1
    feed(gw, out(req.rid, 0, "z", [7], "length"))
    resp = await task
    assert resp.status == 200 and (await resp.json())["output_ids"] == [7]
    task = asyncio.create_task(gw.client.get("/health_generate"))
    reqs = await published(gw, 2)
    rid = next(r.rid for r in reqs if r.rid != req.rid)
    feed(gw, RequestError(rid=rid, message="no live scheduler rank", status=503))
    resp = await task
    assert resp.status == 503 and "no live scheduler rank" in (await resp.json())["error"]["message"]


# --- metrics ----------------------------------------------------------------------------------


def test_histogram_and_render() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 3.0):
        h.observe(v)
    text = render(h.samples("dpserve:time_to_first_token_seconds", {"a": "b"}))
    assert "# TYPE dpserve:time_to_first_token_seconds histogram" in text
    assert 'dpserve:time_to_first_token_seconds_bucket{a="b",le="0.1"} 1' in text
    assert 'dpserve:time_to_first_token_seconds_bucket{a="b",le="1"} 3' in text
    assert 'dpserve:time_to_first_token_seconds_bucket{a="b",le="+Inf"} 4' in text
    assert 'dpserve:time_to_first_token_seconds_count{a="b"} 4' in text
    assert 'dpserve:time_to_first_token_seconds_sum{a="b"} 4.05' in text


def test_gateway_metrics_time_requests() -> None:
    now = [0.0]
    m = GatewayMetrics(clock=lambda: now[0])
    m.on_start("a")
    now[0] = 0.5
    m.observe(TextBatch(outputs=[out("a", 0, "x", [1])]))
    now[0] = 0.9
    m.observe(TextBatch(outputs=[out("a", 1, "yz", [2, 3], "length")]))
    m.on_start("b")
    m.on_abort("b")
    assert (m.ttft.count, m.ttft.sum) == (1, 0.5)
    assert m.itl.count == 2 and abs(m.itl.sum - 0.4) < 1e-9
    assert (m.e2e.count, m.e2e.sum) == (1, 0.9)
    assert m.generation_tokens == 3 and m.prompt_tokens == 3
    assert dict(m.finished) == {"length": 1, "abort": 1}
    assert not m._started and not m._last_token  # nothing leaks


async def test_metrics_route_renders_ranks_gateway_and_snapshots(gw: Harness) -> None:
    report = LoadReport(dp_rank=1, seq=1, timestamp=0, holding_tokens=5, num_running=3, num_waiting=4,
                        kv_used=25, kv_total=100, cache_hit_rate=0.5)
    await gw.state.metrics.on_report(report)
    snap = MetricsSnapshot(service="dispatcher", instance="d1",
                           samples=[Sample("dpserve:dispatcher_decisions_total", 7, {"dp_rank": "1", "method": "round_robin"})])
    await gw.state.metrics.snapshots.on_snapshot(snap)
    resp = await gw.client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    assert 'dpserve:num_running_reqs{dp_rank="1"} 3' in text
    assert 'dpserve:num_queue_reqs{dp_rank="1"} 4' in text
    assert 'dpserve:token_usage{dp_rank="1"} 0.25' in text
    assert 'dpserve:cache_hit_rate{dp_rank="1"} 0.5' in text
    assert 'dpserve:dispatcher_decisions_total{dp_rank="1",instance="d1",method="round_robin",service="dispatcher"} 7' in text
    assert 'dpserve:num_requests_in_progress{instance="gw1",service="gateway"} 0' in text
    assert "# TYPE dpserve:e2e_request_latency_seconds histogram" in text


# --- the tokenizer renders chat messages ------------------------------------------------------


def test_tokenizer_renders_chat_template(tiny_model: Any) -> None:
    tok = TextTokenizer(str(tiny_model))
    messages = [ChatMessage(role="user", content="hello there")]
    result = validate(GenerateRequest(rid="c", gateway_id="g", messages=messages), tok)
    assert isinstance(result, TokenizedRequest)
    expected = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there"}]))
    assert result.input_ids == expected
    assert len(expected) > len(tok.encode("hello there"))  # the template added its markup
    empty = validate(GenerateRequest(rid="c", gateway_id="g", messages=[]), tok)
    assert isinstance(empty, RequestError) and "messages" in empty.message


def test_detokenizer_attaches_bytes_of_prompt_tokens_too(tiny_model: Any) -> None:
    decoder = IncrementalDecoder(tiny_model / "tokenizer.json")
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    prompt = tok.encode("the prompt").ids
    got = detokenize_one(TokenOutput(rid="d", gateway_id="g", seq=0, ids=[], num_new=0, prompt_tokens=len(prompt),
                                     completion_tokens=0, input_token_logprobs=[(None, prompt[0])] +
                                     [(-1.0, i) for i in prompt[1:]]), decoder)
    assert got.token_bytes is not None and set(got.token_bytes) == set(prompt)
    assert b"".join(got.token_bytes[i] for i in prompt).decode() == tok.decode(prompt)
