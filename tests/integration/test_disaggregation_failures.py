"""Prefill/decode disaggregation when things break, with real processes (`--prefill-dp-size 1
--decode-dp-size 2`, tiny Llama): a prefill rank that stops answering, a prefill rank killed while
a decode rank waits for its rows, a decode rank killed while it decodes a request a prefill rank
prefilled.

Every affected request completes with the greedy output of the same prompt served without the
failure (a reference run on the healthy deployment, its prompt shipped; between the two runs
/flush_cache empties the decode ranks' caches, so the second run is shipped again, not served
from cache); the decode rank's log and metrics give the reason it prefilled locally; afterwards a
long prompt is prefilled remotely again, and every rank is back to idle with no KV held.

One deployment serves the three tests (a start costs ~20 s on two cores): --dead-rank-timeout
5 is well above --disaggregation-transfer-timeout 2, so a frozen prefill rank times the transfer
out before anyone counts it dead, and a killed decode rank is dead (its request migrates) 5 s on.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.client import generate, post, stream
from tests.integration.failures import loads, service_pids, wait_loads
from tests.integration.test_disaggregation import metric, wait_metric

TRANSFER_TIMEOUT = 2.0
FLAGS = (
    "--prefill-dp-size", "1", "--decode-dp-size", "2", "--disaggregation-min-prompt-tokens", "64",
    "--disaggregation-transfer-timeout", str(TRANSFER_TIMEOUT), "--dead-rank-timeout", "5",
    "--heartbeat-interval", "0.1", "--request-timeout", "120",
)
DECODE, PREFILL = (0, 1), 2  # global DP ranks: the decode side first
PROMPT_LEN = 600
SHORT = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def prompt(seed: int) -> list[int]:
    """A distinct PROMPT_LEN-token prompt per seed (no prefix shared with another seed's)."""
    return [20 + (seed * 131 + i * 37 + i * i) % 900 for i in range(PROMPT_LEN)]


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Any:
    return server_factory(*FLAGS)


@pytest.fixture(autouse=True)
def _thawed(server: Any) -> Iterator[None]:
    """A failed test must not leave the prefill rank frozen for the next."""
    yield
    for pid in service_pids(server.proc.pid, "services.scheduler", disaggregation_mode="prefill"):
        os.kill(pid, signal.SIGCONT)


def all_idle(ls: dict[int, dict[str, Any]]) -> bool:
    """Every rank live and holding nothing: no request, no KV but its evictable cache."""
    return all(
        r in ls and ls[r]["status"] == "live" and ls[r]["num_running"] == ls[r]["num_waiting"] == ls[r]["kv_used"] == 0
        for r in (*DECODE, PREFILL)
    )


def ready(server: Any) -> dict[int, dict[str, Any]]:
    return wait_loads(server.url, "every rank live and idle", all_idle, 120)


def flush(server: Any) -> None:
    """Empties every rank's prefix cache (each flushes once idle, and logs it)."""
    before = server.log().count("flush_cache freed=")
    status, body = post(server.url + "/flush_cache", {})
    assert status == 200, body
    deadline = time.monotonic() + 20
    while server.log().count("flush_cache freed=") < before + 3:
        assert time.monotonic() < deadline, "the ranks did not flush their caches"
        time.sleep(0.05)


def prefill_pid(server: Any) -> int:
    (pid,) = service_pids(server.proc.pid, "services.scheduler", disaggregation_mode="prefill")
    return pid


def local_prefill_reason(server: Any, rid: str) -> str | None:
    """Why the decode rank prefilled `rid` itself, from its log; None: it did not fall back."""
    found = re.search(rf"rid={re.escape(rid)} prefilled locally: (.*)", server.log())
    return found[1] if found else None


def failures(server: Any, *reasons: str) -> float:
    """The decode ranks' transfer failures for any of `reasons`."""
    return sum(metric(server.url, "dpserve:kv_transfer_failures_total", mode="decode", reason=r) for r in reasons)


def reference(server: Any, seed: int, rid: str, sampling: dict[str, Any] = SHORT) -> list[int]:
    """The prompt's greedy output on the healthy deployment, its KV shipped from the prefill rank."""
    remote = metric(server.url, "dpserve:prefill_requests_total", mode="decode", where="remote")
    out = generate(server.url, input_ids=prompt(seed), sampling_params=sampling, rid=rid, timeout=60)
    assert local_prefill_reason(server, rid) is None, server.log()[-3000:]
    assert wait_metric(server.url, "dpserve:prefill_requests_total", remote + 1, mode="decode", where="remote") > remote
    flush(server)
    return list(out["output_ids"])


def remote_again(server: Any, seed: int, rid: str) -> None:
    """A new long prompt goes to the prefill rank and its KV arrives: no local fallback."""
    remote = metric(server.url, "dpserve:prefill_requests_total", mode="decode", where="remote")
    out = generate(server.url, input_ids=prompt(seed), sampling_params=SHORT, rid=rid, timeout=60)
    assert len(out["output_ids"]) == SHORT["max_new_tokens"]
    assert local_prefill_reason(server, rid) is None, server.log()[-3000:]
    assert wait_metric(server.url, "dpserve:prefill_requests_total", remote + 1, mode="decode", where="remote") > remote


def test_transfer_timeout_prefills_locally_and_the_stale_task_is_harmless(server: Any) -> None:
    ready(server)
    fallbacks = server.log().count("prefilled locally")
    expected = reference(server, 3, "pd-timeout-ref")
    pid = prefill_pid(server)
    timeouts = failures(server, "timeout")
    shipped = metric(server.url, "dpserve:kv_transfer_bytes_total", mode="prefill")
    sends_failed = metric(server.url, "dpserve:kv_transfer_failures_total", mode="prefill", reason="send")
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = generate(server.url, input_ids=prompt(3), sampling_params=SHORT, rid="pd-timeout", timeout=60)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    print(f"the frozen prefill rank's request took {took:.2f}s")
    assert out["output_ids"] == expected
    assert TRANSFER_TIMEOUT <= took < TRANSFER_TIMEOUT + 10
    # the gloo pair's receive times out after the same 2 s: still a timeout, not a broken pair
    reason = local_prefill_reason(server, "pd-timeout")
    assert reason == f"no KV from prefill rank {PREFILL} after {TRANSFER_TIMEOUT:.0f}s", reason
    assert wait_metric(server.url, "dpserve:kv_transfer_failures_total", timeouts + 1, mode="decode",
                       reason="timeout") == timeouts + 1
    # thawed, the prefill rank runs the stale task: ships its rows on the pair the decode rank left
    # (or fails to), and its PrefillDone finds no one waiting
    deadline = time.monotonic() + 15
    while (metric(server.url, "dpserve:kv_transfer_bytes_total", mode="prefill") == shipped
           and metric(server.url, "dpserve:kv_transfer_failures_total", mode="prefill", reason="send") == sends_failed):
        assert time.monotonic() < deadline, f"the prefill rank never ran the stale task:\n{server.log()[-3000:]}"
        time.sleep(0.2)
    assert loads(server.url)[PREFILL]["status"] == "live"
    remote_again(server, 13, "pd-timeout-after")
    ready(server)
    assert server.log().count("prefilled locally") == fallbacks + 1  # the timed-out request's, nothing else


def test_prefill_rank_killed_mid_transfer(server: Any) -> None:
    before = ready(server)
    expected = reference(server, 1, "pd-killed-ref")
    pid = prefill_pid(server)
    old_instance = before[PREFILL]["instance_id"]
    broke = failures(server, "transfer", "prefill_rank_lost")
    os.kill(pid, signal.SIGSTOP)  # frozen, then killed while a decode rank waits for its rows
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(generate, server.url, input_ids=prompt(1), sampling_params=SHORT, rid="pd-killed",
                             timeout=60)
        try:
            wait_loads(server.url, "a decode rank holding the prompt",
                       lambda ls: any(ls[r]["holding_tokens"] >= PROMPT_LEN for r in DECODE), 10)
        finally:
            os.kill(pid, signal.SIGKILL)
        out = future.result(timeout=60)
    assert out["output_ids"] == expected
    reason = local_prefill_reason(server, "pd-killed")
    assert reason is not None, server.log()[-3000:]
    # the pair broke (its canary receive saw the connection close), or its reports stopped before that showed
    assert "broke" in reason or "stopped reporting" in reason, reason
    print(f"the killed prefill rank's request: prefilled locally: {reason}")
    deadline = time.monotonic() + 10  # metrics come in snapshots, one a second
    while failures(server, "transfer", "prefill_rank_lost") < broke + 1:
        assert time.monotonic() < deadline, "no transfer / prefill_rank_lost failure counted"
        time.sleep(0.25)
    # the launcher restarts it; its first long prompt is shipped from there again
    back = wait_loads(server.url, "the prefill rank back",
                      lambda ls: ls[PREFILL]["status"] == "live" and ls[PREFILL]["instance_id"] != old_instance, 120)
    new_instance = back[PREFILL]["instance_id"]
    remote_again(server, 11, "pd-killed-after")
    assert wait_metric(server.url, "dpserve:kv_transfer_bytes_total", 1, mode="prefill", instance=new_instance) > 0
    ready(server)


def test_decode_rank_killed_while_decoding_a_shipped_prompt(server: Any) -> None:
    before = ready(server)
    long = {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}
    expected = reference(server, 2, "pd-decode-ref", long)
    ready(server)  # the rank that served it reports idle, so the stream is placed on idle ranks
    prefill_instance = before[PREFILL]["instance_id"]
    shipped = metric(server.url, "dpserve:kv_transfer_bytes_total", mode="prefill", instance=prefill_instance)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream, server.url, input_ids=prompt(2), sampling_params=long, rid="pd-decode")
        # the rank the dispatcher has it accepted on (its only request), and decoding it there
        def decoding(ls: dict[int, dict[str, Any]]) -> list[int]:
            return [r for r in DECODE if ls[r]["accepted_requests"] >= 1 and ls[r]["num_running"] >= 1]

        now = wait_loads(server.url, "a decode rank decoding it", decoding, 20)
        (rank,) = decoding(now)
        print(f"killing decode rank {rank}, which runs it: {now[rank]}")
        (pid,) = service_pids(server.proc.pid, "services.scheduler", disaggregation_mode="decode", dp_rank=str(rank))
        os.kill(pid, signal.SIGKILL)
        events = future.result(timeout=120)
    final = events[-1]
    assert final["meta_info"]["finish_reason"]["type"] == "length", final
    assert final["output_ids"] == expected
    for a, b in zip(events, events[1:], strict=False):  # nothing repeated, nothing lost
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
    log = server.log()
    assert "resume rid=pd-decode mode=migrate" in log, log[-3000:]
    assert local_prefill_reason(server, "pd-decode") is None  # its prompt was shipped (a migrated one never is)
    # the prefill rank is untouched: the same instance, live, and it ships the next long prompt
    now = loads(server.url)
    assert now[PREFILL]["status"] == "live" and now[PREFILL]["instance_id"] == prefill_instance
    remote_again(server, 12, "pd-decode-after")
    assert wait_metric(server.url, "dpserve:kv_transfer_bytes_total", shipped + 1, mode="prefill",
                       instance=prefill_instance) > shipped
    # the killed rank comes back (the launcher restarts it); nothing is held anywhere
    ready(server)


def test_a_killed_prefill_ranks_task_goes_to_the_other_prefill_rank(server_factory: Any) -> None:
    """Two prefill ranks (global 1 and 2), one decode rank (0): the prefill rank the dispatcher chose
    is killed before it answers; the decode rank sends the task to the other prefill rank, keeping
    its reservation, and the request is shipped from there, with the reference output."""
    server = server_factory("--prefill-dp-size", "2", "--decode-dp-size", "1", "--disaggregation-min-prompt-tokens",
                            "64", "--dead-rank-timeout", "5", "--heartbeat-interval", "0.1", "--request-timeout", "120",
                            "--log-level", "debug")  # the dispatcher's debug line names the prefill rank it chose
    wait_loads(server.url, "every rank live and idle", lambda ls: all(
        r in ls and ls[r]["status"] == "live" and ls[r]["kv_used"] == 0 for r in (0, 1, 2)), 120)
    expected = reference(server, 4, "pd-retry-ref")
    pids = {1 + local: service_pids(server.proc.pid, "services.scheduler", disaggregation_mode="prefill",
                                    dp_rank=str(local))[0] for local in (0, 1)}

    def shipped(rank: int) -> float:
        return metric(server.url, "dpserve:kv_transfer_bytes_total", mode="prefill", dp_rank=str(rank))

    before = {rank: shipped(rank) for rank in pids}
    for pid in pids.values():  # neither answers until the chosen one is dead
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(generate, server.url, input_ids=prompt(4), sampling_params=SHORT, rid="pd-retry",
                                 timeout=60)
            deadline = time.monotonic() + 10
            while not (chosen := re.search(r"dispatch rid=pd-retry .* prefill=dp(\d+)", server.log())):
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.05)
            target = int(chosen[1])
            other = 3 - target
            os.kill(pids[target], signal.SIGKILL)
            os.kill(pids[other], signal.SIGCONT)
            out = future.result(timeout=60)
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert out["output_ids"] == expected
    log = server.log()
    assert re.search(rf"rid=pd-retry sent to prefill rank {other} instead: ", log), log[-3000:]
    assert local_prefill_reason(server, "pd-retry") is None
    assert wait_metric(server.url, "dpserve:kv_transfer_retries_total", 1, mode="decode") == 1
    assert wait_metric(server.url, "dpserve:kv_transfer_bytes_total", before[other] + 1, mode="prefill",
                       dp_rank=str(other)) > before[other]
