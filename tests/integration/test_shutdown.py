"""Graceful shutdown: SIGTERM to `dpserve serve` stops accepting (503), lets running requests finish
within `--shutdown-grace-period`, then exits, leaving no process behind."""

from __future__ import annotations

import json
import math
import signal
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.client import post, stream
from tests.integration.test_launcher import alive, descendants

LONG = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}  # seconds of work, on any CPU


def _refused(url: str) -> tuple[int, Any]:
    """A new request during the drain: its status and body (0: the connection was refused)."""
    try:
        return post(url + "/generate", {"text": "late", "sampling_params": {"max_new_tokens": 2}}, timeout=10)
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def _wait_gone(tree: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in tree if alive(p)]


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits(server_factory: Any) -> None:
    server = server_factory("--dp-size", "1", "--shutdown-grace-period", "30")
    tree = descendants(server.proc.pid)
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream, server.url, text=f"finish me {i}", sampling_params=LONG) for i in range(4)]
        time.sleep(1.0)
        assert not any(f.done() for f in running)
        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        seen = []
        while time.monotonic() - t0 < 10 and not all(f.done() for f in running):
            status, body = _refused(server.url)
            seen.append(status)
            if status == 503:
                assert body["error"]["message"] == "the server is shutting down"
                break
            time.sleep(0.1)
        assert 503 in seen, seen
        results = [f.result(timeout=60) for f in running]  # the running requests finish
    for events in results:
        assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
        assert len(events[-1]["output_ids"]) == LONG["max_new_tokens"]
    assert server.proc.wait(60) == 0
    assert not _wait_gone(tree, 10)
    assert "drained" in server.log()


@pytest.mark.slow
def test_grace_period_bounds_the_drain(server_factory: Any) -> None:
    server = server_factory("--dp-size", "1", "--shutdown-grace-period", "1", "--max-running-requests", "1")
    tree = descendants(server.proc.pid)
    endless = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}
    # one request at a time, and enough of them to need ~10 s on this machine (timed here, not
    # assumed): far more than the 1 s before SIGTERM plus the 1 s grace period, so the drain is cut
    t0 = time.monotonic()
    stream(server.url, text="warm up", sampling_params=endless)
    one = time.monotonic() - t0
    n = min(48, max(6, math.ceil(10 / one)))
    with ThreadPoolExecutor(n) as pool:
        running = [pool.submit(stream, server.url, text=f"too long {i}", sampling_params=endless) for i in range(n)]
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert server.proc.wait(30) == 0
        took = time.monotonic() - t0
        outcomes = [f.exception(timeout=30) or f.result()[-1] for f in running]
    complete = [o for o in outcomes if isinstance(o, dict) and len(o.get("output_ids", [])) == 2000]
    cut = [o for o in outcomes if o not in complete]
    print(f"one request {one:.2f} s; {len(complete)} of {n} complete; exit after {took:.2f} s")
    assert cut, f"none was cut: all {n} ran to the end"
    for o in cut:  # each cut request is told why: a 503 before its stream began, else a last event
        if isinstance(o, urllib.error.HTTPError):
            assert o.code == 503 and json.loads(o.read())["error"]["message"] == "the server is shutting down"
        else:
            assert o == {"error": {"message": "the server is shutting down", "type": "server_error", "code": 503}}, o
    assert took < 1 + 10, took  # the grace period, then the cut and the other services' exits
    assert not _wait_gone(tree, 10)
    log = server.log()
    assert "grace period over: cancelling" in log
    assert "did not stop" not in log  # nobody needed SIGKILL
