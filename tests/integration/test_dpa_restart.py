"""A scheduler rank of a torch.distributed world dies; its world restarts.

First the step sync alone: a collective whose peer is dead or silent fails with WorldBroken
(within --dist-timeout) instead of hanging. Then a rank of a DP-attention world is SIGKILLed under
load (DeepSeek-V3 tiny, tp 2 dp 2).

The dead rank breaks the whole torch.distributed world: its peer's next collective fails, so the
peer exits with one clear log line instead of hanging; the dispatcher sees both DP ranks stop
reporting; the launcher restarts the world on a fresh --dist-init-addr. Every request in flight
ends — with its full greedy output if it migrated (only the restarted world can take it here: a
single world is every DP rank there is) or with a clear 503 — and the restarted ranks (new
instance ids) serve new requests with transformers' greedy output.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from services.launcher.supervisor import free_port
from services.launcher.tiny_model import create_tiny_model
from services.scheduler.dist_sync import GroupSync, WorldBroken, init_world
from services.scheduler.dp_attention import ParallelLayout, new_attn_groups
from tests.integration.client import generate, stream
from tests.integration.failures import loads, service_pids, wait_loads
from tests.integration.tp_reference import reference, wait_ranks

DPA = ("--tp-size", "2", "--dp-size", "2", "--enable-dp-attention")
FLAGS = ("--dead-rank-timeout", "1.0", "--heartbeat-interval", "0.1", "--request-timeout", "90")
MAX_NEW = 240  # decoding lasts seconds, so the kill lands mid-generation on a fast machine too
PROMPT_LENGTHS = (9, 9, 9, 9)  # one length: transformers' reference decodes them as one batch


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(create_tiny_model(tmp_path_factory.mktemp("dpa-restart") / "deepseek_v3", arch="deepseek_v3"))


@pytest.fixture(scope="module")
def refs(model: Path) -> list[tuple[list[int], list[int]]]:
    return reference(model, lengths=PROMPT_LENGTHS, max_new=MAX_NEW)


def _greedy(max_new: int = MAX_NEW) -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}


def _outcome(events: list[dict[str, Any]], expected: list[int]) -> str:
    """'completed' (the full greedy output, streamed without repeats or gaps) or 'error' (a clear
    503); anything else fails the test."""
    final = events[-1]
    if "error" in final:
        error = final["error"]
        assert error.get("code") == 503 or "503" in str(error), final
        assert "DP rank" in error["message"] or "no live scheduler rank" in error["message"], final
        return "error"
    assert final["meta_info"]["finish_reason"]["type"] == "length", final
    assert final["output_ids"] == expected
    for a, b in zip(events, events[1:], strict=False):
        assert b["output_ids"][: len(a["output_ids"])] == a["output_ids"]
    return "completed"


def _silent_or_dead_peer(rank: int, port: int, peer: str, out_dir: str) -> None:
    """Rank 0 of a 2-rank world (dist timeout 1 s) waits in a collective; rank 1 never joins it:
    it sleeps ('silent', alive but out of step) or exits ('dead'). Rank 0 writes what it got."""
    layout = ParallelLayout.from_args(2, 2, rank, enable_dp_attention=True)
    init_world(layout, f"127.0.0.1:{port}", "cpu", timeout_s=1.0)
    sync = GroupSync(layout, new_attn_groups(layout))
    assert sync.gather_counts(rank + 1) == [1, 2]  # the world works
    if rank == 1:
        if peer == "dead":
            os._exit(9)
        time.sleep(3)  # well past rank 0's timeout
        os._exit(0)
    try:
        sync.gather_counts(7)
        got = "returned"
    except WorldBroken as e:
        got = f"WorldBroken: {e}"
    Path(out_dir, "rank0.txt").write_text(got)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("peer", ["silent", "dead"])
def test_collective_fails_instead_of_hanging(tmp_path: Path, peer: str) -> None:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_silent_or_dead_peer, args=(r, port, peer, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    procs[0].join(60)
    assert procs[0].exitcode == 0, f"rank 0 did not end cleanly: exitcode={procs[0].exitcode}"
    got = (tmp_path / "rank0.txt").read_text()
    assert got.startswith("WorldBroken: gather_counts:"), got
    if peer == "silent":
        assert "Timed out" in got or "timed out" in got, got
    procs[1].join(60)
    assert procs[1].exitcode == (9 if peer == "dead" else 0)


@pytest.mark.slow
def test_dead_dpa_rank_restarts_its_world(server_factory: Any, model: Path, refs) -> None:
    server = server_factory("--model-path", str(model), *DPA, *FLAGS, "--dist-timeout", "10")
    wait_ranks(server.url, 2)
    before = loads(server.url)
    with ThreadPoolExecutor(len(refs)) as pool:
        futures = [pool.submit(stream, server.url, 100, input_ids=p, sampling_params=_greedy()) for p, _ in refs]
        wait_loads(server.url, "both DP groups decoding", lambda ls: all(r["num_running"] >= 1 for r in ls.values()))
        time.sleep(0.3)  # a few tokens streamed
        (victim,) = service_pids(server.proc.pid, "services.scheduler", tp_rank="1")
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        # no request hangs: each ends (the streams' own read timeout is the bound)
        results = [f.result(timeout=120) for f in futures]
        ended_after = time.monotonic() - t_kill
    outcomes = [_outcome(events, expected) for events, (_, expected) in zip(results, refs, strict=True)]
    log = server.log()
    # the survivor failed its collective and left on its own, saying why
    assert "torch.distributed world broken (tp_rank=0" in log, log[-4000:]
    assert "restarting its group schedulers" in log
    assert "migrating rid=" in log  # requests were running when the world broke
    assert "restarts with --dist-init-addr" in log
    # the world came back whole: both DP ranks live, as new instances
    back = wait_loads(
        server.url, "both DP ranks live again as new instances",
        lambda ls: all(ls[d]["status"] == "live" and ls[d]["instance_id"] != before[d]["instance_id"] for d in (0, 1)),
        90,
    )
    assert sorted(back) == [0, 1]
    # and serves: each DP group reproduces transformers' greedy output
    for dp_rank, (prompt, expected) in zip((0, 1), refs[:2], strict=True):
        out = generate(server.url, input_ids=prompt, sampling_params=_greedy(24), routed_dp_rank=dp_rank)
        assert out["output_ids"] == expected[:24]
    print(f"requests ended {ended_after:.1f}s after the kill: {outcomes}")


@pytest.mark.slow
def test_dead_tp_rank_migrates_to_the_other_replica(server_factory: Any, model: Path, refs) -> None:
    """Two replicas of tp 2 (no DP attention): a dead rank of replica 0 takes its world down; its
    requests finish on replica 1 with the output they would have had without the failure."""
    server = server_factory("--model-path", str(model), "--tp-size", "2", "--dp-size", "2", *FLAGS, "--dist-timeout", "4")
    wait_ranks(server.url, 2)
    # idle longer than --dist-timeout: an idle leader's keepalive keeps its follower inside the timeout
    time.sleep(5)
    assert "world broken" not in server.log()
    before = loads(server.url)
    with ThreadPoolExecutor(len(refs)) as pool:
        futures = [pool.submit(stream, server.url, 100, input_ids=p, sampling_params=_greedy()) for p, _ in refs]
        wait_loads(server.url, "both replicas decoding", lambda ls: all(r["num_running"] >= 1 for r in ls.values()))
        time.sleep(0.3)
        (victim,) = service_pids(server.proc.pid, "services.scheduler", dp_rank="0", tp_rank="1")
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=120) for f in futures]
    outcomes = [_outcome(events, expected) for events, (_, expected) in zip(results, refs, strict=True)]
    assert outcomes == ["completed"] * len(refs)
    log = server.log()
    assert "torch.distributed world broken (tp_rank=0 dp_rank=0)" in log, log[-4000:]
    assert "restarting its group scheduler0:" in log
    assert log.count("resume rid=") >= 1 and "mode=migrate" in log
    # only replica 0 restarted; it rejoins and serves
    back = wait_loads(
        server.url, "replica 0 live again as a new instance",
        lambda ls: ls[0]["status"] == "live" and ls[0]["instance_id"] != before[0]["instance_id"], 90,
    )
    assert back[1]["instance_id"] == before[1]["instance_id"]
    prompt, expected = refs[0]
    out = generate(server.url, input_ids=prompt, sampling_params=_greedy(24), routed_dp_rank=0)
    assert out["output_ids"] == expected[:24]
