"""The gateway's HTTP behaviour, with a fake bus: outputs are fed straight into the stream state."""

from __future__ import annotations

import ast
import asyncio
import graphlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

import services.gateway
from services.gateway.app import build_app
from services.gateway.protocol import InvalidRequest, parse_generate
from services.gateway.replies import error_body
from services.gateway.shutdown import drain_requests
from services.gateway.state import GatewayState
from services.gateway.streams import RequestStream
from shared.config import ServerArgs
from shared.messages import (
    Abort,
    FinishReason,
    GenerateRequest,
    LoadReport,
    RequestError,
    TextBatch,
    TextOutput,
)
from shared.subjects import Subjects
from tests.fakes import FakeBus


async def wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.002)


def step(
    rid: str,
    seq: int,
    text: str,
    ids: list[int],
    finish: FinishReason | None = None,
    full_text: str | None = None,
) -> TextOutput:
    return TextOutput(
        rid=rid,
        seq=seq,
        text=text,
        new_ids=ids,
        prompt_tokens=3,
        completion_tokens=seq + 1,
        cached_tokens=1,
        finish=finish,
        full_text=full_text,
    )


class Harness:
    def __init__(self, state: GatewayState, bus: FakeBus, client: TestClient) -> None:
        self.state = state
        self.bus = bus
        self.client = client

    async def published(self, rid: str) -> GenerateRequest:
        await wait_for(lambda: any(r.rid == rid for r in self.bus.of(GenerateRequest)))
        return next(r for r in self.bus.of(GenerateRequest) if r.rid == rid)

    def feed(self, *outs: TextOutput | RequestError) -> None:
        self.state.streams.feed(TextBatch(outputs=list(outs)))

    def aborts(self) -> list[str]:
        return [
            m.rid for s, m in self.bus.sent if isinstance(m, Abort) and s == self.state.subjects.sched_control
        ]


@pytest.fixture
async def make_gateway() -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient] = []

    async def make(requester: Any = None, **overrides: Any) -> Harness:
        args = ServerArgs(**({"request_timeout": 5.0} | overrides))
        bus = FakeBus()
        state = GatewayState(bus, Subjects(args.subject_prefix), args, gateway_id="gw1", requester=requester)
        client = TestClient(TestServer(build_app(state)))
        await client.start_server()
        clients.append(client)
        return Harness(state, bus, client)

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def gw(make_gateway: Callable[..., Any]) -> Harness:
    return await make_gateway()


async def read_sse(resp: ClientResponse) -> list[Any]:
    """Every `data:` payload: parsed JSON, or the string "[DONE]"."""
    events: list[Any] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


async def next_event(resp: ClientResponse) -> Any:
    while True:
        line = (await resp.content.readline()).decode().strip()
        if line:
            payload = line[len("data: ") :]
            return payload if payload == "[DONE]" else json.loads(payload)


def assert_error(body: Any, status: int, contains: str = "") -> None:
    assert body["error"]["code"] == status
    assert isinstance(body["error"]["type"], str)
    assert contains in body["error"]["message"], body


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, contains",
    [
        ({}, "exactly one of"),
        ({"text": "a", "input_ids": [1]}, "exactly one of"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
        ({"text": 5}, "$.text"),
        ({"text": "a", "sampling_params": "x"}, "$.sampling_params"),
        ({"text": "a", "sampling_params": {"max_new_tokens": "ten"}}, "$.sampling_params.max_new_tokens"),
        ({"text": "a", "sampling_params": {"nucleus": 0.9}}, "nucleus"),
        ({"text": "a", "stream": "yes"}, "$.stream"),
        ({"input_ids": []}, "empty"),
        ({"input_ids": [1, "x"]}, "$.input_ids[1]"),
        ({"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
        ({"text": "a", "sampling_params": {"stop": [""]}}, "stop"),
    ],
)
async def test_invalid_requests_get_400(gw: Harness, body: Any, contains: str) -> None:
    resp = await gw.client.post("/generate", json=body)
    assert resp.status == 400
    assert resp.content_type == "application/json"
    data = await resp.json()
    assert_error(data, 400, contains)
    assert data["error"]["type"] == "invalid_request_error"
    assert gw.bus.sent == []


async def test_non_json_body_gets_400(gw: Harness) -> None:
    resp = await gw.client.post("/generate", data=b"{not json", headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert_error(await resp.json(), 400, "JSON")


@pytest.mark.parametrize("route", ["/generate", "/v1/chat/completions", "/v1/completions"])
async def test_json_nested_too_deeply_gets_400(gw: Harness, route: str) -> None:
    deep = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past the decoder's recursion limit
    resp = await gw.client.post(route, data=deep, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "nested too deeply" in (await resp.json())["error"]["message"]


async def test_body_over_8_mib_gets_413(gw: Harness) -> None:
    body = b'{"text": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    resp = await gw.client.post("/generate", data=body)
    assert resp.status == 413
    assert_error(await resp.json(), 413)
    assert gw.bus.sent == []


def test_parse_generate_fills_defaults() -> None:
    req = parse_generate(b'{"input_ids": [5, 6]}', "gw", 1.0)
    assert req.input_ids == [5, 6] and req.text is None
    assert len(req.rid) == 32 and req.gateway_id == "gw" and req.created == 1.0
    with pytest.raises(InvalidRequest):
        parse_generate(b'{"text": "a", "routed_dp_rank": -1}', "gw", 1.0)


# --- the published request and the non-streaming response ---------------------------------------


async def test_generate_publishes_request_and_reorders_outputs(gw: Harness) -> None:
    body = {
        "text": "hi",
        "rid": "r1",
        "routed_dp_rank": 2,
        "sampling_params": {"max_new_tokens": 7, "temperature": 0, "stop": ["\n"]},
    }
    task = asyncio.create_task(gw.client.post("/generate", json=body))
    req = await gw.published("r1")
    subject = next(s for s, m in gw.bus.sent if m is req)
    assert subject == gw.state.subjects.tokenize
    assert req.gateway_id == "gw1" and req.text == "hi" and req.input_ids is None
    assert (
        req.sampling.max_new_tokens == 7 and req.sampling.temperature == 0.0 and req.sampling.stop == ["\n"]
    )
    assert req.stream is False and req.routed_dp_rank == 2 and req.created > 0

    # Out of order, with a duplicate: the gateway waits for seq 0 and ignores the repeat.
    stop = FinishReason(type="stop", matched="\n")
    gw.feed(step("r1", 2, " world\nx", [30, 31], finish=stop, full_text="Hello world"))
    gw.feed(step("r1", 1, "lo", [20]))
    await asyncio.sleep(0.01)
    assert not task.done()
    gw.feed(step("r1", 0, "Hel", [10]), step("r1", 1, "lo", [20]))
    resp = await task
    assert resp.status == 200
    data = await resp.json()
    assert data["text"] == "Hello world"
    assert data["output_ids"] == [10, 20, 30, 31]
    meta = data["meta_info"]
    assert meta["id"] == "r1"
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 3 and meta["cached_tokens"] == 1
    assert meta["finish_reason"] == {"type": "stop", "matched": "\n"}
    assert meta["e2e_latency"] >= 0
    assert "r1" not in gw.state.streams
    assert gw.aborts() == []


async def test_length_finish_reason_and_generated_rid(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/generate", json={"input_ids": [1, 2, 3]}))
    await wait_for(lambda: bool(gw.bus.of(GenerateRequest)))
    rid = gw.bus.of(GenerateRequest)[0].rid
    assert len(rid) == 32
    gw.feed(step(rid, 0, "ab", [4, 5], finish=FinishReason(type="length", length=2), full_text="ab"))
    data = await (await task).json()
    assert data["meta_info"]["id"] == rid
    assert data["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


async def test_request_error_keeps_its_status(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "bad"}))
    await gw.published("bad")
    gw.feed(RequestError(rid="bad", message="prompt is too long", status=400))
    resp = await task
    assert resp.status == 400
    assert_error(await resp.json(), 400, "prompt is too long")
    assert gw.aborts() == []


async def test_request_error_before_stream_starts_is_plain_json(gw: Harness) -> None:
    task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "bad", "stream": True}))
    await gw.published("bad")
    gw.feed(RequestError(rid="bad", message="no scheduler", status=503))
    resp = await task
    assert resp.status == 503
    assert_error(await resp.json(), 503, "no scheduler")


async def test_duplicate_rid_in_progress_gets_400(gw: Harness) -> None:
    first = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "dup"}))
    await gw.published("dup")
    resp = await gw.client.post("/generate", json={"text": "y", "rid": "dup"})
    assert resp.status == 400
    assert_error(await resp.json(), 400, "already in progress")
    gw.feed(step("dup", 0, "z", [1], finish=FinishReason(type="length", length=1), full_text="z"))
    assert (await first).status == 200


async def test_too_many_in_progress_gets_503(make_gateway: Callable[..., Any]) -> None:
    gw = await make_gateway(max_queued_requests=1)
    first = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "a"}))
    await gw.published("a")
    resp = await gw.client.post("/generate", json={"text": "y", "rid": "b"})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert_error(await resp.json(), 503)
    gw.feed(step("a", 0, "z", [1], finish=FinishReason(type="length", length=1), full_text="z"))
    assert (await first).status == 200


async def test_timeout_gets_504_and_aborts(make_gateway: Callable[..., Any]) -> None:
    gw = await make_gateway(request_timeout=0.1)
    resp = await gw.client.post("/generate", json={"text": "x", "rid": "slow"})
    assert resp.status == 504
    assert_error(await resp.json(), 504, "timed out")
    await gw.state.drain()
    assert gw.aborts() == ["slow"]
    assert "slow" not in gw.state.streams
    assert gw.state.metrics.finished["abort"] == 1 and not gw.state.metrics._started


async def test_a_request_the_bus_refuses_leaves_nothing_behind(gw: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(subject: str, msg: Any) -> None:
        raise ConnectionError("nats is down")

    monkeypatch.setattr(gw.bus, "publish", refuse)
    resp = await gw.client.post("/generate", json={"text": "x", "rid": "r"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert_error(await resp.json(), 503, "the serving bus is unavailable")
    assert len(gw.state.streams) == 0 and not gw.state.recovery.originals
    assert not gw.state.metrics._started  # no timer left running for a request that never left
    await gw.state.drain()
    assert gw.aborts() == []


async def test_the_lifecycle_times_a_request_and_keeps_its_copy_while_it_runs(gw: Harness) -> None:
    """`submit` starts the metric timers and keeps the copy for resubmission; the outputs end the
    timers; `release` drops the copy (an abort ends the timers: test_timeout_gets_504_and_aborts)."""
    task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "life"}))
    req = await gw.published("life")
    assert gw.state.recovery.originals["life"] is req
    done = step("life", 0, "a", [1], finish=FinishReason(type="length", length=1), full_text="a")
    await gw.state.on_output(TextBatch(outputs=[done]))
    assert (await task).status == 200
    metrics = gw.state.metrics
    assert (metrics.ttft.count, metrics.e2e.count, dict(metrics.finished)) == (1, 1, {"length": 1})
    assert "life" not in gw.state.recovery.originals


# --- streaming ----------------------------------------------------------------------------------


async def test_stream_is_cumulative_and_ends_with_done(gw: Harness) -> None:
    async with asyncio.timeout(5):
        task = asyncio.create_task(
            gw.client.post("/generate", json={"text": "x", "rid": "s", "stream": True})
        )
        await gw.published("s")
        gw.feed(step("s", 1, "b", [2]))  # early: held until seq 0 arrives
        gw.feed(step("s", 0, "a", [1]))
        resp = await task
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        first = await next_event(resp)
        assert first["text"] == "ab" and first["output_ids"] == [1, 2]
        assert first["meta_info"]["finish_reason"] is None
        gw.feed(step("s", 3, "d", [4], finish=FinishReason(type="length", length=4), full_text="abcd"))
        gw.feed(step("s", 2, "c", [3]))
        rest = await read_sse(resp)
    assert rest[-1] == "[DONE]"
    events = [first, *rest[:-1]]
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    last = events[-1]
    assert last["text"] == "abcd" and last["output_ids"] == [1, 2, 3, 4]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert all(e["meta_info"]["id"] == "s" for e in events)
    assert gw.aborts() == []


async def test_final_output_arriving_during_a_write_still_streams_the_final_event(
    gw: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final step lands while the handler is writing the previous event: the last event
    before [DONE] must still be the final one (it once broke out with a non-final event)."""
    import services.gateway.generate as generate_module

    real = generate_module.sse_event
    calls = 0

    def sse_event_that_lets_the_final_step_land(event: Any) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:  # while the first event is being written, the request finishes
            gw.feed(step("race", 1, "b", [2], finish=FinishReason(type="length", length=2), full_text="ab"))
        return real(event)

    monkeypatch.setattr(generate_module, "sse_event", sse_event_that_lets_the_final_step_land)
    async with asyncio.timeout(5):
        task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "race", "stream": True}))
        await gw.published("race")
        gw.feed(step("race", 0, "a", [1]))
        resp = await task
        events = await read_sse(resp)
    assert events[-1] == "[DONE]"
    last = events[-2]
    assert last["text"] == "ab" and last["output_ids"] == [1, 2]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 2}


async def test_stream_holds_back_a_split_stop_string(gw: Harness) -> None:
    body = {"text": "x", "rid": "st", "stream": True, "sampling_params": {"stop": ["STOP"]}}
    async with asyncio.timeout(5):
        task = asyncio.create_task(gw.client.post("/generate", json=body))
        await gw.published("st")
        gw.feed(step("st", 0, "Hello ST", [1, 2]))  # "ST" may begin the stop string
        resp = await task
        first = await next_event(resp)
        assert first["text"] == "Hello"  # the last len("STOP") - 1 characters are held back
        stop = FinishReason(type="stop", matched="STOP")
        gw.feed(step("st", 1, "OP", [3], finish=stop, full_text="Hello "))
        rest = await read_sse(resp)
    assert rest[-1] == "[DONE]"
    events = [first, *rest[:-1]]
    assert all("S" not in e["text"] for e in events)
    assert events[-1]["text"] == "Hello "
    assert events[-1]["meta_info"]["finish_reason"] == {"type": "stop", "matched": "STOP"}


async def test_stream_client_disconnect_aborts(gw: Harness) -> None:
    async with asyncio.timeout(5):
        task = asyncio.create_task(
            gw.client.post("/generate", json={"text": "x", "rid": "gone", "stream": True})
        )
        await gw.published("gone")
        gw.feed(step("gone", 0, "a", [1]))
        resp = await task
        assert (await next_event(resp))["text"] == "a"
        resp.close()  # drop the connection mid-stream
        await wait_for(lambda: gw.aborts() == ["gone"])
        await wait_for(lambda: "gone" not in gw.state.streams)
    gw.feed(step("gone", 1, "b", [2]))  # late outputs for a dropped rid are ignored


async def test_non_stream_client_disconnect_aborts(gw: Harness) -> None:
    async with asyncio.timeout(5):
        task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "bye"}))
        await gw.published("bye")
        task.cancel()
        await wait_for(lambda: gw.aborts() == ["bye"])


async def test_grace_period_over_cuts_every_request_and_aborts_it(gw: Harness) -> None:
    """After the grace period each running request is told the server is shutting down (a 503, or
    an error event then [DONE] once its stream began) and aborted on its scheduler."""
    async with asyncio.timeout(5):
        streaming = asyncio.create_task(
            gw.client.post("/generate", json={"text": "x", "rid": "s", "stream": True})
        )
        whole = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "w"}))
        chat = asyncio.create_task(
            gw.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        )
        await wait_for(lambda: len(gw.bus.of(GenerateRequest)) == 3)
        gw.feed(step("s", 0, "a", [1]))
        resp = await streaming
        assert (await next_event(resp))["text"] == "a"
        await drain_requests(gw.state.draining, gw.state.streams, grace=0.05)
        assert await read_sse(resp) == [error_body("the server is shutting down", 503), "[DONE]"]
        for task in (whole, chat):
            answer = await task
            assert answer.status == 503
            assert_error(await answer.json(), 503, "the server is shutting down")
        await gw.state.drain()
    assert sorted(gw.aborts()) == sorted(r.rid for r in gw.bus.of(GenerateRequest))
    assert len(gw.state.streams) == 0


def test_request_stream_mismatched_full_text_never_unsends() -> None:
    s = RequestStream("r", stop=None)
    s.feed(step("r", 0, "abc", [1]))
    assert s.released == "abc"
    s.feed(step("r", 1, "d", [2], finish=FinishReason(type="length", length=2), full_text="xyz"))
    assert s.released == "abc"  # stream stops where it was
    assert s.text == "xyz"  # the final text is full_text
    assert s.done


# --- other routes -------------------------------------------------------------------------------


async def test_health_needs_a_live_rank(gw: Harness) -> None:
    resp = await gw.client.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"status": "no live scheduler rank"}

    now = [100.0]
    gw.state.liveness.clock = lambda: now[0]
    report = LoadReport(
        dp_rank=0,
        seq=1,
        timestamp=0.0,
        holding_tokens=0,
        num_running=0,
        num_waiting=0,
        kv_used=0,
        kv_total=10,
    )
    await gw.state.liveness.on_report(report)
    resp = await gw.client.get("/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}

    now[0] += gw.state.args.dead_rank_timeout + 0.01
    assert (await gw.client.get("/health")).status == 503


async def test_models(gw: Harness) -> None:
    resp = await gw.client.get("/v1/models")
    assert resp.status == 200
    data = await resp.json()
    assert data["object"] == "list"
    [model] = data["data"]
    assert model["id"] == gw.state.args.model_name
    assert model["object"] == "model" and model["owned_by"] == "dpserve"
    assert isinstance(model["created"], int)


async def test_unknown_path_and_wrong_method_are_json(gw: Harness) -> None:
    resp = await gw.client.get("/nope")
    assert resp.status == 404
    assert_error(await resp.json(), 404, "/nope")
    resp = await gw.client.get("/generate")
    assert resp.status == 405
    assert "POST" in resp.headers.get("Allow", "")
    assert_error(await resp.json(), 405)


async def test_chunked_body_over_8_mib_gets_413(gw: Harness) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        for _ in range(9):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    resp = await gw.client.post("/generate", data=chunks())
    assert resp.status == 413
    assert_error(await resp.json(), 413)


async def test_stream_timeout_after_headers_sends_error_event(make_gateway: Callable[..., Any]) -> None:
    gw = await make_gateway(request_timeout=0.2)
    task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "t", "stream": True}))
    await gw.published("t")
    gw.feed(step("t", 0, "a", [1]))
    resp = await task
    events = await read_sse(resp)
    assert events[0]["text"] == "a"
    assert_error(events[-2], 504, "timed out")
    assert events[-1] == "[DONE]"
    await gw.state.drain()
    assert gw.aborts() == ["t"]


async def test_a_lost_request_is_submitted_again_at_a_new_epoch(make_gateway: Callable[..., Any]) -> None:
    """The dispatcher twice does not know a request of which nothing arrived: the gateway submits it
    again at a new seq epoch, so steps of the original, should it turn up after all, are ignored."""
    from services.gateway.migrate import EPOCH_BITS

    class Unknown:
        async def request(self, subject: str, msg: Any, reply_type: type, timeout: float) -> Any:
            return reply_type(status="unknown")

    gw = await make_gateway(requester=Unknown())
    recovery = gw.state.recovery
    async with asyncio.timeout(5):
        task = asyncio.create_task(gw.client.post("/generate", json={"text": "x", "rid": "lost", "stream": True}))
        original = await gw.published("lost")
        stream = gw.state.streams.get("lost")
        assert stream is not None and original.first_seq == 0
        await recovery.check_stalled(stream)  # unknown once: not yet
        assert len(gw.bus.of(GenerateRequest)) == 1
        await recovery.check_stalled(stream)  # unknown twice: lost
        again = gw.bus.of(GenerateRequest)[-1]
        assert len(gw.bus.of(GenerateRequest)) == 2 and again.rid == "lost"
        assert again.first_seq >= 1 << EPOCH_BITS and again.first_seq % (1 << EPOCH_BITS) == 0  # a new epoch
        assert again.text == original.text
        gw.feed(step("lost", 0, "late", [7]))  # the original after all: ignored
        epoch = again.first_seq
        gw.feed(step("lost", epoch, "a", [1]))
        gw.feed(step("lost", epoch + 1, "b", [2], finish=FinishReason(type="length", length=2), full_text="ab"))
        events = await read_sse(await task)
    assert events[-1] == "[DONE]"
    assert events[-2]["text"] == "ab" and events[-2]["output_ids"] == [1, 2]
    assert all("late" not in e["text"] for e in events[:-1])


# --- module structure ---------------------------------------------------------------------------


def gateway_imports(root: Path) -> dict[str, set[str]]:
    """module -> the gateway modules it imports, wherever in the file (TYPE_CHECKING blocks too)."""
    modules = {p.stem for p in root.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "services.gateway" + (f".{node.module}" if node.module else "") if node.level else node.module or ""
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[:2] == ["services", "gateway"] and len(parts) > 2 and parts[2] in modules:
                    deps.add(parts[2])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_gateway_imports_run_one_way() -> None:
    """Routes import the state; nothing imports the app but the entry point; no import cycle."""
    graph = gateway_imports(Path(services.gateway.__file__).parent)
    assert {"state", "generate", "openai", "replies"} <= graph.keys()
    assert {m for m, deps in graph.items() if "app" in deps} == {"__main__"}
    assert not graph["state"] & {"generate", "openai", "sglang_routes", "app"}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle among gateway modules: {' -> '.join(e.args[1])}")
