"""End to end with `--dp-size 2`: every load-balance method serves every request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.config import LOAD_BALANCE_METHODS
from tests.integration.client import generate, get


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in LOAD_BALANCE_METHODS if m != "shortest_queue"])
def test_every_method_completes_all_requests(server_factory, method: str) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--dp-size", "2", "--load-balance-method", method)
    deadline = time.monotonic() + 120
    while True:  # /health answers once one rank is live; wait for both
        status, loads = get(server.url + "/get_loads")
        if status == 200 and [r["status"] for r in loads["ranks"]] == ["live", "live"]:
            break
        assert time.monotonic() < deadline, loads
        time.sleep(0.2)
    system = "You are a helpful assistant who answers briefly. " * 4
    prompts = [system + f"question {i}: " + "why? " * (i % 7) for i in range(16)]

    def run(prompt: str) -> dict:
        return generate(server.url, text=prompt, sampling_params={"temperature": 0, "max_new_tokens": 8})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, prompts))
    assert all(r["meta_info"]["completion_tokens"] == 8 or r["meta_info"]["finish_reason"]["type"] == "stop"
               for r in results)
    deadline = time.monotonic() + 5
    while True:  # finished requests leave the accepted set with the ranks' next reports
        status, loads = get(server.url + "/get_loads")
        assert status == 200 and loads["load_balance_method"] == method
        if all(r["accepted_requests"] == 0 for r in loads["ranks"]) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert sorted(r["dp_rank"] for r in loads["ranks"]) == [0, 1]
    for r in loads["ranks"]:
        assert r["status"] == "live" and r["in_flight_requests"] == 0 and r["accepted_requests"] == 0, r


def test_a_rank_reports_going_idle_at_once_not_at_its_next_heartbeat(server_factory) -> None:  # type: ignore[no-untyped-def]
    """The last steps of a request run faster than MIN_REPORT_GAP, so their reports are skipped; the
    rank reports when it goes idle, or the dispatcher would count the finished request as running
    (and place the next one elsewhere) until the next heartbeat, 5 s here."""
    server = server_factory("--heartbeat-interval", "5", "--dead-rank-timeout", "30")
    for i in range(5):
        out = generate(server.url, text=f"count to {i}", sampling_params={"temperature": 0, "max_new_tokens": 24,
                                                                          "ignore_eos": True})
        assert out["meta_info"]["completion_tokens"] == 24
        t0 = time.monotonic()
        while True:
            status, loads = get(server.url + "/get_loads")
            assert status == 200, loads
            (rank,) = loads["ranks"]
            if rank["accepted_requests"] == rank["num_running"] == rank["kv_used"] == 0:
                break
            assert time.monotonic() - t0 < 2, f"request {i}: the rank still reports it running: {rank}"
            time.sleep(0.05)
