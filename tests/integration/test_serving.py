"""The five services end to end on a real bus: batching, streaming, stop strings, bad input."""

from __future__ import annotations

import asyncio
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from tokenizers import Tokenizer

from shared.messages import (
    GenerateRequest,
    RequestError,
    SamplingParams,
    TextBatch,
    TextOutput,
    TokenBatch,
    TokenizedRequest,
    TokenOutput,
)
from shared.subjects import Subjects
from tests.integration.client import generate, get, post, stream
from tests.integration.failures import wait_loads


@pytest.fixture(scope="module")
def server(server_factory, nats_url: str):
    return server_factory("--dp-size", "2", "--nats-url", nats_url)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_model / "tokenizer.json"))


def greedy(max_new: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True} | extra


def test_32_concurrent_requests_match_alone(server, tokenizer: Tokenizer) -> None:
    rng = random.Random(7)
    vocab = tokenizer.get_vocab_size()
    cases = []
    for i in range(32):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 200))]
        max_new = rng.choice([1, 2, 5, 17, 40, 64, 120, 200])
        cases.append((prompt, max_new, i % 2 == 0))

    def run(case: tuple[list[int], int, bool]) -> list[int]:
        prompt, max_new, streamed = case
        if streamed:
            events = stream(server.url, input_ids=prompt, sampling_params=greedy(max_new))
            return list(events[-1]["output_ids"])
        return list(generate(server.url, input_ids=prompt, sampling_params=greedy(max_new))["output_ids"])

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, cases))
    for (prompt, max_new, _), ids in zip(cases, together, strict=True):
        assert len(ids) == max_new
        alone = generate(server.url, input_ids=prompt, sampling_params=greedy(max_new))["output_ids"]
        assert ids == alone


def test_stream_and_text_agree_with_tokenizer(server, tokenizer: Tokenizer) -> None:
    body = {"text": "The quick brown fox — ünïcödé 中文 🙂", "sampling_params": greedy(48)}
    whole = generate(server.url, **body)
    events = stream(server.url, **body)
    assert events[-1]["output_ids"] == whole["output_ids"]
    assert events[-1]["text"] == whole["text"]
    assert whole["text"] == tokenizer.decode(whole["output_ids"], skip_special_tokens=True)
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # cumulative
    assert [e["meta_info"]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 48}


def test_stop_string_is_trimmed(server) -> None:
    base = generate(server.url, text="Once upon a time", sampling_params=greedy(40))
    text = base["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"degenerate stop string from {text!r}"
    expected = text[: text.index(stop)]
    for streamed in (False, True):
        params = greedy(40, stop=[stop])
        if streamed:
            events = stream(server.url, text="Once upon a time", sampling_params=params)
            out = events[-1]
            assert all(stop not in e["text"] for e in events)
        else:
            out = generate(server.url, text="Once upon a time", sampling_params=params)
        assert out["text"] == expected
        assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_stop_token_ids_and_sampling(server) -> None:
    base = generate(server.url, text="hello", sampling_params=greedy(20))
    stop_id = base["output_ids"][5]
    out = generate(server.url, text="hello", sampling_params=greedy(20, stop_token_ids=[stop_id]))
    first = base["output_ids"].index(stop_id)
    assert out["output_ids"] == base["output_ids"][: first + 1]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    params = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "max_new_tokens": 24, "ignore_eos": True, "seed": 11}
    a = generate(server.url, text="hello", sampling_params=params)["output_ids"]
    b = generate(server.url, text="hello", sampling_params=params)["output_ids"]
    assert a == b and len(a) == 24  # same seed, same output


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"sampling_params": {"max_new_tokens": 4}},
        {"text": "hi", "sampling_params": {"max_new_tokens": -1}},
        {"text": 5},
        {"input_ids": "abc"},
        {"input_ids": [1, "x"]},
        {"text": "hi", "sampling_params": "x"},
        {"text": "hi", "sampling_params": {"max_new_tokens": "ten"}},
        {"text": "hi", "sampling_params": {"temprature": 0.5}},
        {"text": "hi", "input_ids": [1, 2]},
        {"input_ids": [10**9]},
    ],
)
def test_bad_input_is_a_400_json_error(server, body: dict[str, Any]) -> None:
    status, out = post(server.url + "/generate", body)
    assert status == 400, out
    assert isinstance(out["error"]["message"], str) and out["error"]["message"]


def test_non_json_and_too_long_prompt(server) -> None:
    status, out = post(server.url + "/generate", None, raw=b"{not json")
    assert status == 400 and out["error"]["message"]
    status, out = post(server.url + "/generate", {"input_ids": [5] * 5000, "sampling_params": {"max_new_tokens": 1}})
    assert status == 400 and "context length" in out["error"]["message"]
    assert generate(server.url, text="still serving", sampling_params=greedy(3))["meta_info"]["completion_tokens"] == 3


async def test_malformed_bus_messages_are_dropped(server, nats_url: str) -> None:
    subjects = Subjects("dpserve")
    nc = await nats.connect(nats_url)
    garbage = [b"", b"\xc1", b"\x93\x01\x02", msgspec.msgpack.encode({"rid": 5}), b"\xff" * 64]
    targets = [
        subjects.tokenize, subjects.dispatch, subjects.sched_req(0), subjects.sched_req(1),
        subjects.sched_control, subjects.load(0), subjects.detok, subjects.rank_register,
    ]
    # a well-formed message of the wrong type on each subject, too
    wrong = [msgspec.msgpack.encode(TokenBatch(dp_rank=0, outputs=[])), msgspec.msgpack.encode(
        GenerateRequest(rid="x", gateway_id="nobody", text="hi"))]
    for subject in targets:
        for payload in garbage + wrong:
            await nc.publish(subject, payload)
    # a TokenBatch whose gateway does not exist, and a request for a rank nobody serves
    bad_out = TokenOutput(rid="ghost", gateway_id="nobody", seq=0, ids=[999999], num_new=1,
                          prompt_tokens=1, completion_tokens=1)
    await nc.publish(subjects.detok, msgspec.msgpack.encode(TokenBatch(dp_rank=0, outputs=[bad_out])))
    await nc.publish(subjects.sched_req(0), msgspec.msgpack.encode(
        TokenizedRequest(rid="ghost2", gateway_id="nobody", input_ids=[10**9])))
    await nc.flush()
    await nc.close()
    services = ("tokenizer", "dispatcher", "scheduler", "detokenizer")

    def dropped(service: str) -> bool:
        return any(service in line and "dropped undecodable message" in line for line in server.log().splitlines())

    deadline = time.monotonic() + 15  # each service logs its drop as it reads the garbage
    while not all(dropped(s) for s in services) and time.monotonic() < deadline:
        time.sleep(0.1)
    for service in services:
        assert dropped(service), service
    out = generate(server.url, text="after the garbage", sampling_params=greedy(5))
    assert out["meta_info"]["completion_tokens"] == 5
    assert server.proc.poll() is None


def test_health_and_models(server) -> None:
    status, out = get(server.url + "/health")
    assert status == 200
    status, out = get(server.url + "/v1/models")
    assert status == 200 and out["object"] == "list" and out["data"][0]["object"] == "model"
    status, out = get(server.url + "/no/such/route")
    assert status == 404 and out["error"]["message"]
    json.dumps(out)


async def test_two_runs_of_one_rid_on_a_rank_keep_the_load_accounting(server, nats_url: str) -> None:
    """A request a gateway took for lost is submitted again at a new seq epoch; if the original
    turns up after all, one rank holds two runs of the rid. Each run ends in its own epoch, and the
    dispatcher hears both end (nothing stays "accepted"). The same rid and epoch from another
    gateway is refused with a 400 while the first runs."""
    subjects = Subjects("dpserve")
    nc = await nats.connect(nats_url)
    got: dict[str, list] = {"gw-a": [], "gw-b": []}

    async def collect(msg: Any) -> None:
        batch = msgspec.msgpack.decode(msg.data, type=TextBatch)
        got[msg.subject.rsplit(".", 1)[-1]].extend(batch.outputs)

    for gw in got:
        await nc.subscribe(subjects.out(gw), cb=collect)

    def request(gw: str, first_seq: int, n: int) -> bytes:
        return msgspec.msgpack.encode(GenerateRequest(
            rid="twice", gateway_id=gw, input_ids=[5, 6, 7], routed_dp_rank=0, first_seq=first_seq, stream=True,
            sampling=SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
        ))

    async def until(cond: Any, what: str) -> None:
        deadline = time.monotonic() + 60
        while not cond():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)

    def finals(gw: str) -> list[Any]:
        return [o for o in got[gw] if isinstance(o, TextOutput) and o.finish is not None]

    await nc.publish(subjects.tokenize, request("gw-a", 0, 400))
    await until(lambda: got["gw-a"], "the first run's first step")
    await nc.publish(subjects.tokenize, request("gw-b", 0, 4))  # same rid and epoch, other gateway
    await nc.publish(subjects.tokenize, request("gw-a", 1 << 32, 8))  # the resubmission
    await until(lambda: len(finals("gw-a")) == 2, "both runs' finals")
    await until(lambda: got["gw-b"], "the other gateway's answer")
    await nc.close()
    (refused,) = got["gw-b"]
    assert isinstance(refused, RequestError) and refused.status == 400 and "already in progress" in refused.message
    by_epoch = {o.seq >> 32: o for o in finals("gw-a")}
    assert sorted(by_epoch) == [0, 1]
    assert by_epoch[0].completion_tokens == 400 and by_epoch[1].completion_tokens == 8
    wait_loads(server.url, "rank 0 holding nothing",
               lambda ls: ls[0]["accepted_requests"] == 0 and ls[0]["in_flight_requests"] == 0, timeout=10)
