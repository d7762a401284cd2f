"""The engine behind the real services: prefix cache, chunked prefill, retraction, logprobs and
abort, through HTTP on a real nats-server."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import nats

from shared.messages import Abort, LoadReport, encode
from shared.subjects import Subjects
from tests.integration.client import generate, post


def greedy(max_new: int, **extra: Any) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True} | extra


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 1000) for _ in range(n)]


def test_prefix_cache_chunking_and_retraction_keep_output(server_factory, nats_url: str) -> None:
    small = server_factory(
        "--nats-url", nats_url, "--nats-subject-prefix", "eng1",
        "--max-total-tokens", "400", "--chunked-prefill-size", "32",
    )
    plain = server_factory(
        "--nats-url", nats_url, "--nats-subject-prefix", "eng2",
        "--disable-radix-cache", "--chunked-prefill-size", "-1",
    )
    prefix = ids(100, 1)
    a = generate(small.url, input_ids=prefix + [5, 6], sampling_params=greedy(8))
    b = generate(small.url, input_ids=prefix + [7, 8, 9], sampling_params=greedy(8))
    assert a["meta_info"]["cached_tokens"] == 0
    assert b["meta_info"]["cached_tokens"] >= 96
    assert b["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    b_plain = generate(plain.url, input_ids=prefix + [7, 8, 9], sampling_params=greedy(8))
    assert b_plain["output_ids"] == b["output_ids"] and b_plain["meta_info"]["cached_tokens"] == 0

    # 12 requests of up to 330 tokens each on a 400-token pool: retraction must happen
    cases = [(ids(random.Random(i).randint(20, 150), 100 + i), random.Random(i).randint(60, 180)) for i in range(12)]

    def run(url: str, case: tuple[list[int], int]) -> list[int]:
        return list(generate(url, input_ids=case[0], sampling_params=greedy(case[1]))["output_ids"])

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda c: run(small.url, c), cases))
        want = list(pool.map(lambda c: run(plain.url, c), cases))
    assert got == want
    assert "retract" in small.log()


def test_logprobs_and_stop_in_meta_info(server_factory, nats_url: str) -> None:
    server = server_factory("--nats-url", nats_url, "--nats-subject-prefix", "eng3")
    prompt = ids(12, 3)
    out = generate(
        server.url, input_ids=prompt, sampling_params=greedy(4),
        return_logprob=True, top_logprobs_num=2, logprob_start_len=0,
    )
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["input_token_logprobs"]] == prompt
    assert meta["input_token_logprobs"][0] == [None, prompt[0], None]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(lp <= 0 for lp, _, _ in meta["output_token_logprobs"])
    top = meta["output_top_logprobs"]
    assert len(top) == 4 and all(len(row) == 2 and row[0][1] == t for row, t in zip(top, out["output_ids"], strict=True))
    plain = generate(server.url, input_ids=prompt, sampling_params=greedy(4))
    assert "output_token_logprobs" not in plain["meta_info"] and plain["output_ids"] == out["output_ids"]
    status, err = post(server.url + "/generate", {"input_ids": prompt, "top_logprobs_num": -1})
    assert status == 400, err


def test_abort_of_running_request_frees_kv(server_factory, nats_url: str) -> None:
    server = server_factory("--nats-url", nats_url, "--nats-subject-prefix", "eng4")
    subjects = Subjects("eng4")
    reports: list[LoadReport] = []

    async def watch_and_abort(stop: threading.Event) -> None:
        nc = await nats.connect(nats_url)
        dec = msgspec.msgpack.Decoder(LoadReport)

        async def on(msg: Any) -> None:
            reports.append(dec.decode(msg.data))

        await nc.subscribe(subjects.load_all, cb=on)
        while not any(r.num_running for r in reports):
            await asyncio.sleep(0.01)
        await nc.publish(subjects.sched_control, encode(Abort(rid="long-one")))
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await nc.drain()

    stop = threading.Event()
    watcher = threading.Thread(target=lambda: asyncio.run(watch_and_abort(stop)))
    watcher.start()
    time.sleep(0.5)
    status, out = post(
        server.url + "/generate",
        {"rid": "long-one", "input_ids": ids(50, 4), "sampling_params": greedy(1500)},
    )
    time.sleep(0.5)
    stop.set()
    watcher.join(10)
    assert status == 200 and out["meta_info"]["finish_reason"]["type"] == "abort", out
    assert len(out["output_ids"]) < 1500
    assert max(r.kv_used for r in reports) > 0
    assert reports[-1].kv_used == 0 and reports[-1].num_running == 0
