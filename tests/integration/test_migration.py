"""A scheduler rank SIGKILLed under load (`--dp-size 3`): its running requests migrate.

The streams continue on the other ranks from the tokens already generated: greedy output equals
the output without the failure, and the streamed text never repeats or loses a piece. The launcher
restarts the killed rank and it serves again. With `--disable-migration` they end with a clear
503 error instead.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.client import generate, stream
from tests.integration.failures import service_pids, wait_loads

FLAGS = ("--dp-size", "3", "--dead-rank-timeout", "1.0", "--heartbeat-interval", "0.1", "--request-timeout", "120")
# long enough that the kill lands mid-generation however fast the machine is
GREEDY = {"temperature": 0, "max_new_tokens": 1000, "ignore_eos": True}
PROMPTS = [f"Story number {i}: once upon a time" for i in range(6)]


def _busiest(ls: dict[int, dict[str, Any]]) -> int:
    return max(ls, key=lambda k: (ls[k]["num_running"], ls[k]["accepted_requests"]))


def _kill_busiest_rank(server: Any) -> tuple[int, str]:
    """SIGKILLs the rank running the most requests once each has generated some tokens, and the
    dispatcher counts them accepted there (else the dispatcher would treat them as in flight)."""
    t0 = time.monotonic()
    wait_loads(server.url, "every rank running", lambda ls: sum(r["num_running"] for r in ls.values()) >= 3, 60)
    time.sleep(0.2)  # a few steps streamed
    now = wait_loads(server.url, "the busiest rank's requests accepted",
                     lambda ls: ls[_busiest(ls)]["accepted_requests"] >= ls[_busiest(ls)]["num_running"] >= 1, 10)
    rank = _busiest(now)
    print(f"killing dp_rank {rank} {time.monotonic() - t0:.2f}s after the burst: {now[rank]}")
    (pid,) = service_pids(server.proc.pid, "services.scheduler", dp_rank=str(rank))
    os.kill(pid, signal.SIGKILL)
    return rank, now[rank]["instance_id"]


def _check_stream(events: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    final = events[-1]
    assert final.get("meta_info", {}).get("finish_reason") is not None, ("the last event is not final", events[-3:])
    assert final["meta_info"]["finish_reason"]["type"] == "length", final
    assert final["output_ids"] == expected["output_ids"]
    assert final["text"] == expected["text"]
    # cumulative events: each is a prefix of the next (nothing repeated, nothing lost)
    for a, b in zip(events, events[1:], strict=False):
        assert b["text"].startswith(a["text"])
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]


@pytest.mark.slow
def test_killed_rank_requests_migrate_and_rank_rejoins(server_factory: Any) -> None:
    server = server_factory(*FLAGS)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batch-invariant: same greedy output as alone
        expected = list(pool.map(lambda p: generate(server.url, text=p, sampling_params=GREEDY), PROMPTS))
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, server.url, text=p, sampling_params=GREEDY) for p in PROMPTS]
        rank, old_instance = _kill_busiest_rank(server)
        t_kill = time.monotonic()
        wait_loads(server.url, f"rank {rank} dead", lambda ls: ls[rank]["status"] == "dead", 10)
        dead_after = time.monotonic() - t_kill
        results = [f.result(timeout=120) for f in futures]
    for events, exp in zip(results, expected, strict=True):
        _check_stream(events, exp)
    log = server.log()
    migrated = log.count("resume rid=")
    assert migrated >= 1, log[-3000:]
    assert "mode=migrate" in log
    print(f"rank {rank} dead after {dead_after:.2f}s; {migrated} requests migrated")
    # the launcher restarts it; it rejoins with a new instance and serves
    back = wait_loads(server.url, f"rank {rank} live again",
                      lambda ls: ls[rank]["status"] == "live" and ls[rank]["instance_id"] != old_instance, 120)
    assert back[rank]["instance_id"] != old_instance
    out = generate(server.url, text="back", sampling_params={"max_new_tokens": 3, "ignore_eos": True}, routed_dp_rank=rank)
    assert out["meta_info"]["completion_tokens"] == 3


@pytest.mark.slow
def test_disable_migration_ends_them_with_a_clear_error(server_factory: Any) -> None:
    server = server_factory(*FLAGS, "--disable-migration")
    # all three ranks up first (/health answers after one), so the burst spreads as in production
    wait_loads(server.url, "three live ranks", lambda ls: sum(r["status"] == "live" for r in ls.values()) == 3, 60)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, server.url, text=p, sampling_params=GREEDY) for p in PROMPTS]
        rank, _ = _kill_busiest_rank(server)
        results = [f.result(timeout=120) for f in futures]
    failed = [ev[-1] for ev in results if "error" in ev[-1]]
    log = server.log()
    dead = re.findall(r"rank (?:dead|restarted) dp_rank=\d+.*", log)
    assert failed, f"the killed rank {rank} was running requests; dispatcher: {dead}; log: {log[-3000:]}"
    for event in failed:
        assert f"DP rank {rank} stopped reporting while serving the request" in event["error"]["message"]
        assert event["error"]["code"] == 503 or "503" in str(event["error"])
    done = [ev[-1] for ev in results if "error" not in ev[-1]]
    assert all(e["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"] for e in done)
    assert "resume rid=" not in server.log()
