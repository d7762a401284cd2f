"""Ranks that die, freeze, resume and join, with each service started alone.

Rank 0 has an explicit `--dp-rank`; rank 1 asks the dispatcher's rank registry. A frozen rank
(SIGSTOP) is dead within the timeout: its in-flight requests are served elsewhere, the one it was
running ends with a clear 503; after SIGCONT it is live again. A killed rank's slot is released
and a new scheduler without `--dp-rank` takes it.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.launcher.supervisor import free_port, health_ok
from tests.integration.client import generate, get, post

FLAGS = ["--dp-size", "2", "--torch-threads", "1", "--heartbeat-interval", "0.1", "--dead-rank-timeout", "1.0"]


class Cluster:
    def __init__(self, model: Path, nats_url: str, log_path: Path) -> None:
        self.common = ["--model-path", str(model), "--nats-url", nats_url, *FLAGS]
        self.log = open(log_path, "wb")
        self.procs: list[subprocess.Popen[bytes]] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        for name in ("dispatcher", "tokenizer", "detokenizer"):
            self.start(name)
        self.start("gateway", "--port", str(port))
        self.rank0 = self.start("scheduler", "--dp-rank", "0")
        self.rank1 = self.start("scheduler")  # asks the registry

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def start(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", *self.common, *extra], stderr=self.log)
        self.procs.append(proc)
        return proc

    def loads(self) -> dict[int, dict[str, Any]]:
        status, body = get(self.url + "/get_loads")
        assert status == 200, body
        return {r["dp_rank"]: r for r in body["ranks"]}

    def wait_for(self, what: str, check: Any, timeout: float = 60) -> dict[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            loads = self.loads()
            if check(loads):
                return loads
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {loads}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tiny_model, nats_url, tmp_path_factory.mktemp("dead_rank") / "log")
    deadline = time.monotonic() + 120
    while not health_ok(c.url):
        assert time.monotonic() < deadline and all(p.poll() is None for p in c.procs)
        time.sleep(0.2)
    c.wait_for("two live ranks", lambda ls: all(ls.get(k, {}).get("status") == "live" for k in (0, 1)), 120)
    yield c
    for p in c.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
    for p in c.procs:
        p.wait(30)
    c.log.close()


def live(ranks: tuple[int, ...]) -> Any:
    return lambda ls: all(ls.get(k, {}).get("status") == "live" for k in ranks)


def test_registry_assigned_the_free_rank_and_header_routes(cluster: Cluster) -> None:
    loads = cluster.loads()
    assert loads[0]["instance_id"] != loads[1]["instance_id"]
    req = urllib.request.Request(
        cluster.url + "/generate",
        data=json.dumps({"text": "hello", "sampling_params": {"max_new_tokens": 2}}).encode(),
        headers={"Content-Type": "application/json", "X-Data-Parallel-Rank": "7"},
    )
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("rank 7 does not exist")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and "routed_dp_rank 7 is not a live DP rank" in json.loads(e.read())["error"]["message"]


@pytest.mark.slow
def test_frozen_rank_is_dead_then_live_again(cluster: Cluster) -> None:
    long = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    with ThreadPoolExecutor(16) as pool:
        # rank 1 holds a 1000-token prompt, so frozen rank 0 (a short prompt and the tokens it
        # generated before the freeze) still looks the lighter one to the burst, on any machine
        heavy = pool.submit(post, cluster.url + "/generate", {
            "input_ids": [5] * 1000, "routed_dp_rank": 1,
            "sampling_params": {"temperature": 0, "max_new_tokens": 600, "ignore_eos": True}})
        cluster.wait_for("rank 1 holding the heavy request", lambda ls: ls[1]["holding_tokens"] >= 1000, 30)
        running = pool.submit(post, cluster.url + "/generate",
                              {"text": "a long story", "sampling_params": long, "routed_dp_rank": 0})
        cluster.wait_for("rank 0 running the long request", lambda ls: ls[0]["num_running"] == 1, 30)
        cluster.rank0.send_signal(signal.SIGSTOP)
        t_stop = time.monotonic()
        # a burst right after the freeze: rank 0 still looks live and light, so some go there
        short = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
        burst = [pool.submit(generate, cluster.url, text=f"burst {i}", sampling_params=short) for i in range(12)]
        loads = cluster.wait_for("rank 0 dead", lambda ls: ls[0]["status"] == "dead", 10)
        dead_after = time.monotonic() - t_stop
        assert dead_after < 3.0, dead_after
        assert loads[1]["status"] == "live"
        results = [f.result(timeout=120) for f in burst]  # served, the re-dispatched ones by rank 1
        assert all(r["meta_info"]["completion_tokens"] == 4 for r in results)
        status, body = running.result(timeout=30)
        assert status == 503, body
        assert heavy.result(timeout=60)[0] == 200
        assert "DP rank 0 stopped reporting while serving the request" in body["error"]["message"]
    found = re.search(r"rank dead dp_rank=0 redispatching=(\d+) failing=(\d+)", cluster.log_text())
    assert found is not None
    redispatched, failed = int(found[1]), int(found[2])
    assert redispatched >= 1 and failed == 1  # the burst saw rank 0 as the lighter one at first
    cluster.rank0.send_signal(signal.SIGCONT)
    cluster.wait_for("rank 0 live again", live((0, 1)), 10)
    # on resuming it drops every request taken from it (the rank-targeted aborts)
    deadline = time.monotonic() + 10
    while True:
        text = cluster.log_text()
        dropped = text.count("abort rid=") + text.count("dropped rid=")
        if dropped >= redispatched + failed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert dropped >= redispatched + failed
    out = generate(cluster.url, text="back again", sampling_params={"max_new_tokens": 3, "ignore_eos": True}, routed_dp_rank=0)
    assert out["meta_info"]["completion_tokens"] == 3
    # the frozen rank dropped what was taken from it: nothing stays held there
    cluster.wait_for("rank 0 idle", lambda ls: ls[0]["num_running"] == 0 and ls[0]["num_waiting"] == 0, 20)


@pytest.mark.slow
def test_killed_rank_is_replaced_through_the_registry(cluster: Cluster) -> None:
    cluster.wait_for("both live", live((0, 1)), 10)
    old = cluster.loads()[1]["instance_id"]
    cluster.rank1.kill()
    cluster.rank1.wait(10)
    cluster.wait_for("rank 1 dead", lambda ls: ls[1]["status"] == "dead", 10)
    out = generate(cluster.url, text="still served", sampling_params={"max_new_tokens": 2, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 2
    cluster.rank1 = cluster.start("scheduler")  # no --dp-rank: gets the released rank 1
    loads = cluster.wait_for("rank 1 live again", live((0, 1)), 120)
    assert loads[1]["instance_id"] != old
    out = generate(cluster.url, text="new rank", sampling_params={"max_new_tokens": 2, "ignore_eos": True}, routed_dp_rank=1)
    assert out["meta_info"]["completion_tokens"] == 2
