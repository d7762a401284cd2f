"""The NATS server restarts during load: services reconnect, serving resumes within 5 s, and every
request in flight ends with its output or a clear error (none hangs).

The embedded nats-server is a child of `dpserve serve`; SIGKILL makes the launcher start it again
on the same port, and every service's client reconnects (shared/bus.py).
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from services.launcher.supervisor import wait_port
from tests.integration.client import post
from tests.integration.failures import service_pids

REQ = {"temperature": 0, "max_new_tokens": 120, "ignore_eos": True}


def _outcome(url: str, i: int) -> tuple[int, Any]:
    try:
        return post(url + "/generate", {"text": f"request {i}", "sampling_params": REQ}, timeout=90)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        return -1, repr(e)


@pytest.mark.slow
def test_nats_restart_under_load(server_factory: Any) -> None:
    server = server_factory("--dp-size", "2", "--request-timeout", "60")
    nats_pids = [p for p in service_pids(server.proc.pid, "-p") if "nats-server" in open(f"/proc/{p}/cmdline").read()]
    assert len(nats_pids) == 1, nats_pids
    argv = open(f"/proc/{nats_pids[0]}/cmdline").read().split("\0")
    port = int(argv[argv.index("-p") + 1])
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_outcome, server.url, i) for i in range(8)]
        time.sleep(1.0)
        os.kill(nats_pids[0], signal.SIGKILL)
        t_kill = time.monotonic()
        time.sleep(0.5)
        wait_port("127.0.0.1", port, timeout=20)  # the launcher started it again
        t_up = time.monotonic()
        # serving resumes: the first new request that succeeds
        while True:
            status, body = post(server.url + "/generate", {"text": "after", "sampling_params": {"max_new_tokens": 2}}, timeout=30)
            if status == 200:
                break
            assert time.monotonic() - t_up < 30, body
            time.sleep(0.1)
        resumed_after = time.monotonic() - t_up
        results = [f.result(timeout=120) for f in futures]
    print(f"nats down {t_up - t_kill:.2f}s; serving again {resumed_after:.2f}s after it was back")
    assert resumed_after < 5.0
    for status, body in results:
        assert status != -1, body  # never a hang or a dropped connection
        if status == 200:
            assert body["meta_info"]["completion_tokens"] == REQ["max_new_tokens"]
        else:
            assert status in (503, 504) and body["error"]["message"], body
    assert sum(s == 200 for s, _ in results) >= 1
