"""`--device sim` end to end: `dpserve serve --device sim --dp-size 2` of the Llama-70B sim checkpoint
(config.json + tokenizer, no weights) streams, aborts, and migrates a killed rank's requests, with
outputs that are a function of the request alone (the same on either rank, run after run)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from services.scheduler.sim.checkpoints import write_sim_checkpoint
from tests.conftest import Server
from tests.integration.client import generate, stream
from tests.integration.failures import service_pids, wait_loads

# 0.5: half the modeled time per step (~10 ms a decode step of Llama-70B fp8 on an H200)
FLAGS = ("--device", "sim", "--sim-hardware", "h200", "--sim-time-scale", "0.5", "--dp-size", "2",
         "--context-length", "4096", "--dead-rank-timeout", "1.0", "--request-timeout", "60")
PROMPTS = [f"Story number {i}: once upon a time" for i in range(4)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("sim")
    srv = Server(write_sim_checkpoint(root / "llama-70b", "llama-70b"), root / "serve.log", *FLAGS)
    wait_loads(srv.url, "both ranks reporting", lambda ls: set(ls) == {0, 1} and all(
        r["status"] == "live" for r in ls.values()), 30)
    yield srv
    srv.stop()


def _idle(ls: dict[int, dict[str, Any]]) -> bool:
    return all(r["kv_used"] == 0 and r["num_running"] == 0 and r["num_waiting"] == 0 for r in ls.values())


def test_outputs_deterministic_across_ranks_and_streams(server: Any) -> None:
    params = {"max_new_tokens": 40, "temperature": 0.7}  # sampling parameters do not change sim tokens
    runs = [generate(server.url, text=PROMPTS[0], sampling_params=params, routed_dp_rank=r) for r in (0, 1, 0)]
    assert runs[0]["output_ids"] == runs[1]["output_ids"] == runs[2]["output_ids"]
    assert len(runs[0]["output_ids"]) == 40 and runs[0]["meta_info"]["finish_reason"]["type"] == "length"
    other = generate(server.url, text=PROMPTS[1], sampling_params=params)
    assert other["output_ids"] != runs[0]["output_ids"]
    events = stream(server.url, text=PROMPTS[0], sampling_params=params)
    assert len(events) > 2  # one per step
    assert events[-1]["output_ids"] == runs[0]["output_ids"] and events[-1]["text"] == runs[0]["text"]
    for a, b in zip(events, events[1:], strict=False):
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]


def test_disconnect_aborts_and_frees_kv(server: Any) -> None:
    parsed = urlparse(server.url)
    conns = []
    for i in range(2):
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        body = {"text": PROMPTS[i], "sampling_params": {"max_new_tokens": 3000}, "stream": True}
        conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        conns.append(conn)
    held = wait_loads(server.url, "two requests held", lambda ls: sum(r["num_running"] for r in ls.values()) == 2, 10)
    assert sum(r["kv_used"] for r in held.values()) > 0
    for conn in conns:
        conn.sock.close()
        conn.close()
    wait_loads(server.url, "KV back to zero", _idle, 15)


def test_killed_sim_rank_requests_migrate(server: Any) -> None:
    params = {"max_new_tokens": 400}  # ~4 s at --sim-time-scale 0.5
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = list(pool.map(lambda p: generate(server.url, text=p, sampling_params=params), PROMPTS))
        # idle first: a report from before the streams (still showing the last run) must not pass below
        wait_loads(server.url, "both ranks idle", lambda ls: _idle(ls) and all(
            r["accepted_requests"] == 0 for r in ls.values()), 15)
        futures = [pool.submit(stream, server.url, text=p, sampling_params=params) for p in PROMPTS]
        ls = wait_loads(server.url, "both ranks running", lambda ls: all(
            r["num_running"] >= 1 and r["accepted_requests"] >= r["num_running"] for r in ls.values()), 20)
        time.sleep(0.5)  # some steps streamed
        (pid,) = service_pids(server.proc.pid, "services.scheduler", dp_rank="1")
        os.kill(pid, signal.SIGKILL)
        results = [f.result(timeout=60) for f in futures]
    for events, exp in zip(results, expected, strict=True):
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert events[-1]["output_ids"] == exp["output_ids"]  # the same tokens, across the migration
        for a, b in zip(events, events[1:], strict=False):
            assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
    assert ls[1]["num_running"] >= 1
    log = Path(server.log_path).read_text(errors="replace")
    assert "mode=migrate" in log, log[-3000:]
    # the survivor ends idle with its KV accounted (the launcher's restart of rank 1: test_migration.py)
    try:
        wait_loads(server.url, "rank 0 idle", lambda ls: _idle({0: ls[0]}), 15)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{Path(server.log_path).read_text(errors='replace')[-6000:]}") from None
