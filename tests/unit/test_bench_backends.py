"""`dpserve bench --backend openai|openai-chat` against a fake OpenAI server: the body sent, TTFT at
the first chunk with text, one ITL per later text chunk, output tokens from the usage chunk (else
the requested length), and an error status failing one request without stopping the run."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.bench.backends import BACKENDS, Backend, OpenAIChat, OpenAICompletions
from services.bench.datasets import BenchRequest
from services.bench.main import add_args, main, served_model
from services.bench.report import summarize
from services.bench.runner import run

GAP = 0.05
PIECES = ["", "a", "bc", "d"]  # an empty first chunk (chat: the role) does not start the clock


def fake_openai(seen: list[tuple[dict, str]], usage: bool) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((body, request.headers.get("Authorization", "")))
        if body.get("prompt") == "fail" or body.get("messages", [{}])[0].get("content") == "fail":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        chat = "messages" in body
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in PIECES:
            await asyncio.sleep(GAP)
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            await resp.write(b"data: " + json.dumps({"choices": [choice], "usage": None}).encode() + b"\n\n")
        if usage:
            last = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "served-model"}, {"id": "other"}]})

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    app.router.add_post("/v1/chat/completions", stream)
    app.router.add_get("/v1/models", models)
    return app


async def bench(backend: Backend, reqs: list[BenchRequest], usage: bool = True) -> tuple[list, list]:
    seen: list[tuple[dict, str]] = []
    async with TestServer(fake_openai(seen, usage)) as server:
        results, _ = await run(
            str(server.make_url("")).rstrip("/"), reqs, float("inf"), None, backend, "sk-test"
        )
    return results, seen


@pytest.mark.parametrize("name", ["openai", "openai-chat"])
async def test_openai_stream_timing_and_usage(name: str) -> None:
    req = BenchRequest(prompt_len=3, output_len=4, text="hello there")
    results, seen = await bench(BACKENDS[name](model="m"), [req])
    r = results[0]
    assert r.success and r.text == "abcd"
    assert r.output_len == 5  # the usage chunk's count, not the requested 4
    assert 2 * GAP * 0.8 < r.ttft < r.latency  # the empty first chunk did not count
    assert len(r.itls) == 2 and all(GAP * 0.5 < x < GAP * 10 for x in r.itls)  # one per text chunk
    body, auth = seen[0]
    assert auth == "Bearer sk-test"
    assert body["model"] == "m" and body["max_tokens"] == 4 and body["temperature"] == 0
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    if name == "openai":
        assert body["prompt"] == "hello there" and "messages" not in body
    else:
        assert body["messages"] == [{"role": "user", "content": "hello there"}] and "prompt" not in body


async def test_completions_send_token_ids_and_fall_back_to_requested_length() -> None:
    req = BenchRequest(prompt_len=3, output_len=4, input_ids=[5, 6, 7])
    results, seen = await bench(OpenAICompletions(ignore_eos=False), [req], usage=False)
    assert results[0].success and results[0].output_len == 4
    assert seen[0][0]["prompt"] == [5, 6, 7] and seen[0][0]["ignore_eos"] is False
    assert seen[0][0]["model"] == "default"


async def test_error_status_fails_one_request_only() -> None:
    reqs = [BenchRequest(3, 4, text="fail"), BenchRequest(3, 4, text="ok")]
    results, _ = await bench(OpenAIChat(), reqs)
    assert not results[0].success and "HTTP 500" in results[0].error and "boom" in results[0].error
    assert results[1].success
    s = summarize(results, 1.0, "openai-chat", float("inf"), None)
    assert s.completed == 1 and s.failed == 1 and s.total_output == 5


async def test_model_defaults_to_the_first_served_id() -> None:
    async with TestServer(fake_openai([], True)) as server:
        url = str(server.make_url("")).rstrip("/")
        assert await asyncio.to_thread(served_model, url, "") == "served-model"
        assert await asyncio.to_thread(served_model, url + "/nothing-here", "") == "default"


async def test_cli_chat_sends_token_id_datasets_as_text(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[dict, str]] = []
    async with TestServer(fake_openai(seen, True)) as server:
        parser = argparse.ArgumentParser()
        add_args(parser)
        url = str(server.make_url(""))
        flags = "--num-prompts 2 --random-input-len 8 --random-output-len 4 --api-key k"
        ns = parser.parse_args(
            ["--backend", "openai-chat", "--base-url", url, "--tokenizer", str(tiny_model)] + flags.split()
        )
        assert await asyncio.to_thread(main, ns) == 0
    assert len(seen) == 3  # one warm-up, two measured
    assert all(b["model"] == "served-model" and isinstance(b["messages"][0]["content"], str) for b, _ in seen)
    block = capsys.readouterr().out
    assert "Backend:                                 openai-chat" in block
    assert "Total generated tokens:                  10" in block  # 2 requests x usage 5
