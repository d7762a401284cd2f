"""`dpserve bench` pieces: datasets, the streaming client against a fake SGLang server, the report;
and the CLI's config file and help."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tokenizers import Tokenizer

from services.bench.datasets import random_dataset, shared_prefix_dataset, sharegpt_dataset
from services.bench.report import details, format_block, percentile, summarize
from services.bench.runner import RequestResult, run
from services.launcher.config_file import load_config_file

SEED_BLOCK = next(Path("/work/shared/seeds").glob("002_*.txt"), None)


def test_random_dataset_lengths_and_ids() -> None:
    reqs = random_dataset(50, 40, 10, 0.5, vocab_size=100, seed=3)
    assert len(reqs) == 50
    assert all(20 <= r.prompt_len <= 40 and 5 <= r.output_len <= 10 for r in reqs)
    assert all(r.input_ids is not None and len(r.input_ids) == r.prompt_len for r in reqs)
    assert all(0 < i < 100 for r in reqs for i in r.input_ids or [])
    assert reqs == random_dataset(50, 40, 10, 0.5, vocab_size=100, seed=3)  # seeded


def test_shared_prefix_dataset_shares_system_prompts() -> None:
    reqs = shared_prefix_dataset(3, 4, 16, 5, 7, vocab_size=1000, seed=0)
    assert len(reqs) == 12 and all(r.prompt_len == 21 and r.output_len == 7 for r in reqs)
    prefixes = {tuple((r.input_ids or [])[:16]) for r in reqs}
    assert len(prefixes) == 3


def test_sharegpt_dataset(tmp_path: Path, tiny_model: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    convs = [
        {"conversations": [{"from": "human", "value": "tell me about the sea " * 3}, {"from": "gpt", "value": "the sea is big " * 4}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a long enough reply here"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"id": "no conversations"},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    reqs = sharegpt_dataset(path, 10, tok, seed=0)
    assert len(reqs) == 1  # "hi" is under 4 tokens; one-turn and malformed items are skipped
    assert reqs[0].text == "tell me about the sea " * 3
    assert reqs[0].output_len == len(tok.encode("the sea is big " * 4, add_special_tokens=False).ids)
    path.write_text("{}")
    with pytest.raises(ValueError):
        sharegpt_dataset(path, 10, tok, seed=0)


def test_percentile() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5, 1, 3], 100) == 5


async def test_client_times_a_streaming_generate() -> None:
    """A fake SGLang server: 3 events 50 ms apart carrying 1, 2 and 1 new tokens."""
    seen: list[dict] = []

    async def generate(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        ids: list[int] = []
        for new in (1, 2, 1):
            await asyncio.sleep(0.05)
            ids += [7] * new
            meta = {"completion_tokens": len(ids), "id": f"rid{len(seen)}"}
            event = {"text": "x" * len(ids), "output_ids": ids, "meta_info": meta}
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def failing(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "bad"}}, status=400)

    app = web.Application()
    app.router.add_post("/generate", generate)
    async with TestServer(app) as server:
        reqs = random_dataset(2, 4, 4, 1.0, vocab_size=50, seed=0)
        results, duration = await run(str(server.make_url("")).rstrip("/"), reqs, float("inf"), 1)
    assert all(r.success and r.output_len == 4 and r.text == "xxxx" for r in results)
    r = results[0]
    assert 0.04 < r.ttft < r.latency
    assert len(r.itls) == 3 and all(0.015 < x < 0.5 for x in r.itls)
    assert r.itls[0] == r.itls[1]  # the 2-token event's gap is split evenly
    assert duration >= 2 * 0.14  # max_concurrency=1: one after the other
    assert seen[0]["input_ids"] == reqs[0].input_ids and seen[0]["stream"] is True
    assert seen[0]["sampling_params"]["max_new_tokens"] == 4
    assert [r.rid for r in results] == ["rid1", "rid2"]  # the server's ids, to join with its logs
    d = details(results)
    assert d["rids"] == ["rid1", "rid2"] and d["ttfts"] == [r.ttft for r in results] and d["output_lens"] == [4, 4]

    bad = web.Application()
    bad.router.add_post("/generate", failing)
    async with TestServer(bad) as server:
        results, _ = await run(str(server.make_url("")).rstrip("/"), reqs[:1], 10.0, None)
    assert not results[0].success and "HTTP 400" in results[0].error
    assert details(results)["ttfts"] == [None] and "HTTP 400" in details(results)["errors"][0]


def test_result_block_has_sglang_layout() -> None:
    results = [
        RequestResult(prompt_len=10, success=True, output_len=5, text="abc", ttft=0.1, latency=0.5, itls=[0.1] * 4),
        RequestResult(prompt_len=10, success=False, error="x"),
    ]
    s = summarize(results, 2.0, "dpserve", float("inf"), None, retokenize=len)
    block = format_block(s)
    assert s.completed == 1 and s.failed == 1 and s.total_output_retokenized == 3
    assert "Successful requests:                     1" in block
    assert "Mean TTFT (ms):                          100.00" in block
    assert "Output token throughput (tok/s):         2.50" in block
    if SEED_BLOCK is not None:  # the seed PR's block: same labels, same order, same widths
        text = SEED_BLOCK.read_text()
        seed = text[text.index("============ Serving Benchmark Result"):].splitlines()[:28]
        labels = [re.split(r"\s{2,}|(?<=:)\s", line)[0] for line in seed]
        ours = [re.split(r"\s{2,}|(?<=:)\s", line)[0] for line in block.splitlines()]
        assert ours == labels
        assert [len(line.rstrip()) > 0 for line in seed] == [len(line) > 0 for line in block.splitlines()]


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dp-size: 2\nload_balance_method: round_robin\nrequest-timeout: 5\n")
    assert load_config_file(path) == {"dp_size": 2, "load_balance_method": "round_robin", "request_timeout": 5.0}
    path.write_text("dp-sise: 2\n")
    with pytest.raises(ValueError, match="unknown setting"):
        load_config_file(path)
    bad = tmp_path / "c.json"
    bad.write_text('{"dp_size": "two"}')
    with pytest.raises(ValueError, match="int"):
        load_config_file(bad)


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "services.launcher", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "create-tiny-model", "bench"):
        assert command in out
    bench = subprocess.run([sys.executable, "-m", "services.launcher", "bench", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--request-rate", "--max-concurrency", "--num-prompts", "--dataset-name", "--warmup-requests"):
        assert flag in bench
    serve = subprocess.run([sys.executable, "-m", "services.launcher", "serve", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--config" in serve and "DPSERVE_DP_SIZE" in serve
