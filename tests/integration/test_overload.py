"""Overload: bounded queues at the gateway (--max-queued-requests -> 503) and per DP rank
(--max-queued-requests-per-rank -> 429), both with Retry-After; what is accepted completes; the
gateway's memory stays bounded."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.client import generate, get

GATEWAY_LIMIT, RANK_LIMIT, RUNNING = 12, 2, 2
NEW_TOKENS = 16


def post_with_headers(url: str, body: Any) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def service_pid(root: int, module: str) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == root and module.encode() in cmd:
            return int(pid)
    raise AssertionError(f"no {module} child of {root}")


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Any:
    return server_factory(
        "--max-queued-requests", str(GATEWAY_LIMIT),
        "--max-queued-requests-per-rank", str(RANK_LIMIT),
        "--max-running-requests", str(RUNNING),
    )


def flood(url: str, n: int) -> list[tuple[int, dict[str, str], Any]]:
    body = {"text": "overload", "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}}
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post_with_headers(url + "/generate", body), range(n)))


@pytest.mark.slow
def test_overload_is_refused_with_retry_after(server: Any) -> None:
    gateway = service_pid(server.proc.pid, "services.gateway")
    flood(server.url, 8)  # warm up: allocator arenas, caches
    before = rss_kib(gateway)
    results = []
    for _ in range(3):
        results += flood(server.url, 40)
    after = rss_kib(gateway)

    by_status: dict[int, int] = {}
    for status, headers, body in results:
        by_status[status] = by_status.get(status, 0) + 1
        if status == 200:
            assert body["meta_info"]["completion_tokens"] == NEW_TOKENS
        else:
            assert status in (429, 503), (status, body)
            assert headers.get("Retry-After") == "1" and body["error"]["message"]
    assert by_status.get(200, 0) >= RUNNING  # what was accepted completed
    assert by_status.get(503, 0) > 0  # the gateway's bound
    assert by_status.get(429, 0) > 0  # the rank's bound
    assert any("overloaded" in b["error"]["message"] for s, _, b in results if s == 429)
    assert after - before < 64 * 1024, (before, after)  # 120 requests did not grow the gateway by 64 MiB

    # afterwards: serving normally, nothing left queued or holding KV
    assert generate(server.url, text="after", sampling_params={"max_new_tokens": 3, "ignore_eos": True})["meta_info"]["completion_tokens"] == 3
    status, loads = get(server.url + "/get_loads")
    assert status == 200 and all(r["num_waiting"] == 0 for r in loads["ranks"])
