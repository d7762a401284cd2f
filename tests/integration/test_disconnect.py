"""A client that disconnects aborts its request everywhere; KV usage returns to the idle baseline.

Both shapes: a streaming client that closes the connection after a few events, and a
non-streaming client that closes while its request runs. `GET /get_loads` shows every rank's
`kv_used` (slots held by requests) back at its idle value and nothing running or waiting.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.integration.failures import wait_loads

LONG = {"temperature": 0, "max_new_tokens": 1800, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Any:
    return server_factory("--dp-size", "2")


def _open(url: str, body: dict[str, Any]) -> http.client.HTTPConnection:
    parsed = urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def _idle(ls: dict[int, dict[str, Any]]) -> bool:
    return all(r["kv_used"] == 0 and r["num_running"] == 0 and r["num_waiting"] == 0 for r in ls.values())


def _baseline(url: str) -> dict[int, int]:
    """KV use of both ranks once both report and are idle (/health answers after the first one)."""
    both_idle = lambda ls: set(ls) == {0, 1} and _idle(ls)  # noqa: E731
    return {k: r["kv_used"] for k, r in wait_loads(url, "both ranks idle", both_idle, 30).items()}


def test_streaming_disconnect_aborts_and_frees_kv(server: Any) -> None:
    base = _baseline(server.url)
    conns = [_open(server.url, {"text": f"stream {i}", "sampling_params": LONG, "stream": True}) for i in range(3)]
    for conn in conns:
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")
    running = wait_loads(server.url, "three requests held",
                         lambda ls: sum(r["num_running"] + r["num_waiting"] for r in ls.values()) == 3, 10)
    assert sum(r["kv_used"] for r in running.values()) > sum(base.values())
    t0 = time.monotonic()
    for conn in conns:
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
    after = wait_loads(server.url, "KV back to baseline", _idle, 15)
    assert {k: r["kv_used"] for k, r in after.items()} == base
    print(f"streaming: idle again {time.monotonic() - t0:.2f}s after the disconnect")
    assert server.log().count("abort rid=") >= 3


def test_non_streaming_disconnect_aborts_and_frees_kv(server: Any) -> None:
    base = _baseline(server.url)
    before = server.log().count("abort rid=")
    conns = [_open(server.url, {"text": f"whole {i}", "sampling_params": LONG}) for i in range(2)]
    wait_loads(server.url, "both running", lambda ls: sum(r["num_running"] for r in ls.values()) == 2, 30)
    t0 = time.monotonic()
    for conn in conns:
        conn.sock.close()
        conn.close()
    after = wait_loads(server.url, "KV back to baseline", _idle, 15)
    assert {k: r["kv_used"] for k, r in after.items()} == base
    print(f"non-streaming: idle again {time.monotonic() - t0:.2f}s after the disconnect")
    assert server.log().count("abort rid=") >= before + 2
