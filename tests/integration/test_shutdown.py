"""Graceful shutdown: SIGTERM to `dpserve serve` stops accepting (503), lets running requests finish
within `--shutdown-grace-period`, then exits, leaving no process behind."""

from __future__ import annotations

import signal
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.client import post, stream
from tests.integration.test_launcher import alive, descendants

LONG = {"temperature": 0, "max_new_tokens": 1200, "ignore_eos": True}


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
    # one request at a time: the six need ~12000 steps, far more than fit in the grace period on
    # any machine, so the drain is cut whatever the speed
    server = server_factory("--dp-size", "1", "--shutdown-grace-period", "1", "--max-running-requests", "1")
    tree = descendants(server.proc.pid)
    endless = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}
    with ThreadPoolExecutor(6) as pool:
        running = [pool.submit(stream, server.url, text=f"too long {i}", sampling_params=endless) for i in range(6)]
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert server.proc.wait(30) == 0
        took = time.monotonic() - t0
        outcomes = [f.exception(timeout=30) or f.result()[-1] for f in running]
    # cut off by the grace period: the queued ones never got their 2000 tokens
    complete = [o for o in outcomes if isinstance(o, dict) and len(o.get("output_ids", [])) == 2000]
    assert len(complete) <= 2, [repr(o)[:120] for o in complete]  # at most those that ran before the cut
    print("cut requests saw:", [repr(o)[:120] for o in outcomes])
    assert took < 1 + 35, took  # the grace period, then the supervisor's per-stage SIGKILL bounds
    assert not _wait_gone(tree, 10)
    assert "grace period over: cancelling" in server.log()
