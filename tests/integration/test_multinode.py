"""One deployment over two "hosts": network namespaces, each node's `dpserve serve --nnodes 2
--node-rank K` started inside its own (tests/integration/netns.py).

Each layout's greedy output equals transformers' on the same weights, which is also what every
one-node layout is held to (test_tp_serving.py), so two nodes answer as one node does:
- tiny Llama at dp 2, one replica per node (the replicas on node 1 report over node 1's
  nats-server, clustered with node 0's), started from docker-compose.multinode.yml's command
  and environment, one "compose project" per namespace;
- Llama at tp 2, one world across the nodes (gloo between the namespaces, rendezvous at node 0's
  store under the world's prefix);
- tiny DeepSeek-V3 at tp 2 dp 2 with DP attention, one DP group per node, and at tp 4 dp 2, two
  ranks (one whole attention group) per node.
- tiny Llama with prefill and decode apart, the decode rank on node 0 and the prefill rank on node
  1: a long prompt's KV crosses between the namespaces, at the address node 1 advertises.
`/get_server_info` names each DP rank's node. In every deployment, every TCP socket that listens
in a node's namespace is bound to that node's address: a server left on 127.0.0.1 (or on the
wildcard) fails the test. When node 1's nats-server dies, node 1's rank reconnects to node 0's
server and keeps serving. When node 1 dies mid-stream, its replica's requests migrate to node 0's
and finish with their greedy output, and node 1 rejoins when its launcher is back; when node 1's
cable is pulled and put back, its rank serves again once the NATS route heals. When node 1's
rank keeps dying at its start, node 1's launcher gives up and node 0's ends with it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launcher.supervisor import health_ok
from services.launcher.tiny_model import create_tiny_model
from tests.integration.client import generate, get, stream
from tests.integration.failures import cmdline, loads, wait_loads
from tests.integration.netns import Hosts, NamespacesUnavailable, listening
from tests.integration.test_disaggregation import wait_metric
from tests.integration.test_launcher import descendants
from tests.integration.tp_reference import reference, wait_ranks

ROOT = Path(__file__).resolve().parents[2]
NNODES = 2
FAILURE_FLAGS = ("--dead-rank-timeout", "1.0", "--heartbeat-interval", "0.1", "--request-timeout", "120")
LONG = 200  # new tokens of the streams that a node's death or a pulled cable interrupts
LONG_DPA = 100  # DP attention decodes ~20 tokens/s here: the kill lands after ~7
STORE_PORT, NATS_PORT, CLUSTER_PORT, HTTP_PORT = 29500, 4222, 6222, 30000


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    try:
        made = Hosts.create(NNODES)
    except NamespacesUnavailable as e:
        pytest.skip(f"cannot create network namespaces here: {e}")
    try:
        yield made
    finally:
        made.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multinode-models")
    return {arch: Path(create_tiny_model(root / arch, arch=arch)) for arch in ("llama", "deepseek_v3")}


def serve_argv(hosts: Hosts, model: Path, *flags: str) -> list[list[str]]:
    """Each node's `dpserve serve` command line."""
    return [
        [
            sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model), "--torch-threads", "1",
            "--nnodes", str(NNODES), "--node-rank", str(k), "--dist-init-addr", f"{hosts.node_addr(0)}:{STORE_PORT}",
            "--port", str(HTTP_PORT), "--max-total-tokens", "4096", *flags,
        ]
        for k in range(NNODES)
    ]


def compose_nodes(hosts: Hosts, model: Path) -> tuple[list[list[str]], list[dict[str, str]]]:
    """docker-compose.multinode.yml's command and environment for each node, as local processes
    (the image's model path becomes the tiny model; compose's ${VAR} interpolated as compose does)."""
    (svc,) = yaml.safe_load((ROOT / "docker-compose.multinode.yml").read_text())["services"].values()
    assert svc["network_mode"] == "host"
    argv, envs = [], []
    for k in range(NNODES):
        values = {"NODE_RANK": str(k), "HEAD_ADDR": hosts.node_addr(0)}

        def interpolate(text: str) -> str:
            return re.sub(r"\$\{(\w+)(?::[-?][^}]*)?\}", lambda m: values.get(m.group(1), ""), text)  # noqa: B023

        env = {name: interpolate(str(value)) for name, value in svc["environment"].items()}
        envs.append(env | {"DPSERVE_MODEL_PATH": str(model), "DPSERVE_TORCH_THREADS": "1", "DPSERVE_MAX_TOTAL_TOKENS": "4096"})
        argv.append([sys.executable if a == "python" else a for a in svc["command"]])
    return argv, envs


@pytest.fixture(scope="module")
def all_refs(models: dict[str, Path]) -> dict[str, list[tuple[list[int], list[int]]]]:
    """transformers' greedy continuations of the short prompts, per model, computed once."""
    return {arch: reference(path) for arch, path in models.items()}


class Deployment:
    """Every node's launcher; node 1 starts first, as an operator would bring up workers."""

    def __init__(
        self, hosts: Hosts, logs: Path, argv: list[list[str]], envs: list[dict[str, str]] | None = None,
        wait_healthy: bool = True,
    ) -> None:
        self.hosts = hosts
        self.url = f"http://{hosts.node_addr(0)}:{HTTP_PORT}"
        self.logs = [logs / f"node{k}.log" for k in range(NNODES)]
        self.argv = argv
        self.envs = [os.environ | e for e in envs] if envs else [None] * NNODES
        self.procs = [self._start(k) for k in reversed(range(NNODES))][::-1]
        if not wait_healthy:
            return
        deadline = time.monotonic() + 180
        while not health_ok(self.url):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"the deployment did not start:\n{self.log_tail()}")
            time.sleep(0.2)

    def log(self, k: int) -> str:
        return self.logs[k].read_text(errors="replace")

    def wait_log(self, k: int, text: str, timeout: float) -> None:
        """Until node k's log holds `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.log(k):
            assert time.monotonic() < deadline, f"{text!r} not in node {k}'s log:\n{self.log_tail()}"
            time.sleep(0.1)

    def log_tail(self) -> str:
        return "\n".join(f"--- node {k}\n{self.log(k)[-3000:]}" for k in range(NNODES))

    def pids(self, k: int, program: str) -> list[int]:
        """Node k's processes whose argv[0] is `program`."""
        return [p for p in sorted(descendants(self.procs[k].pid)) if Path(cmdline(p)[0]).name == program]

    def kill_node(self, k: int) -> None:
        """Every process of node k at once, its launcher included (a machine that died)."""
        out = subprocess.run(["ip", "netns", "pids", self.hosts.node_ns(k)], capture_output=True, text=True).stdout
        for pid in out.split():
            os.kill(int(pid), signal.SIGKILL)
        self.procs[k].wait(10)

    def _start(self, k: int) -> subprocess.Popen[bytes]:
        return self.hosts.popen(k, self.argv[k], self.logs[k], env=self.envs[k])

    def restart_node(self, k: int) -> None:
        self.procs[k] = self._start(k)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def llama_dp2(hosts: Hosts, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """docker-compose.multinode.yml's two nodes (dp 2, one replica per host)."""
    argv, envs = compose_nodes(hosts, models["llama"])
    envs = [e | {"DPSERVE_" + f[2:].upper().replace("-", "_"): v for f, v in zip(FAILURE_FLAGS[::2], FAILURE_FLAGS[1::2], strict=True)}
            for e in envs]
    d = Deployment(hosts, tmp_path_factory.mktemp("llama-dp2"), argv, envs)
    try:
        wait_ranks(d.url, 2)
        yield d
    finally:
        d.stop()


@pytest.fixture
def deploy(hosts: Hosts, tmp_path: Path) -> Iterator[object]:
    started: list[Deployment] = []

    def start(model: Path, *flags: str) -> Deployment:
        started.append(Deployment(hosts, tmp_path, serve_argv(hosts, model, *flags)))
        return started[-1]

    yield start
    for d in started:
        d.stop()


def node_of_ranks(url: str) -> dict[int, int]:
    status, info = get(url + "/get_server_info")
    assert status == 200, info
    return {s["dp_rank"]: s["node_rank"] for s in info["internal_states"]}


def assert_binds_node_addresses(d: Deployment) -> None:
    """Every socket listening in node k's namespace is on node k's address."""
    for k in range(NNODES):
        socks = listening(d.procs[k].pid)
        assert socks, f"node {k}: nothing listens"
        wrong = sorted(s for s in socks if s[0] != d.hosts.node_addr(k))
        assert not wrong, f"node {k} ({d.hosts.node_addr(k)}): sockets bound elsewhere: {wrong}"
        assert (d.hosts.node_addr(k), NATS_PORT) in socks and (d.hosts.node_addr(k), CLUSTER_PORT) in socks
    assert (d.hosts.node_addr(0), HTTP_PORT) in listening(d.procs[0].pid)


def streams_with_node1_killed(
    pool: ThreadPoolExecutor, d: Deployment, refs: list[tuple[list[int], list[int]]], greedy: dict[str, Any]
) -> list[Future[list[dict[str, Any]]]]:
    """Streams every prompt of `refs` and kills node 1 once both DP ranks decode (a few steps in)."""
    futures = [pool.submit(stream, d.url, 120, input_ids=p, sampling_params=greedy) for p, _ in refs]
    wait_loads(d.url, "both DP ranks decoding", lambda ls: all(r["num_running"] >= 1 for r in ls.values()))
    time.sleep(0.3)
    d.kill_node(1)
    return futures


def assert_greedy(url: str, refs: list[tuple[list[int], list[int]]], dp_ranks: range) -> None:
    for dp_rank in dp_ranks:
        for prompt, expected in refs:
            body = {"temperature": 0, "max_new_tokens": len(expected), "ignore_eos": True}
            out = generate(url, input_ids=prompt, sampling_params=body, routed_dp_rank=dp_rank)
            assert out["output_ids"] == expected, (dp_rank, len(prompt))


# The deployments share the namespaces and ports: these start (and stop) their own first; the module's
# dp 2 deployment below lives until the module ends.


def test_llama_tp2_one_world_across_nodes(deploy, models, all_refs) -> None:  # noqa: ANN001
    refs = all_refs["llama"]
    d = deploy(models["llama"], "--tp-size", "2")
    wait_ranks(d.url, 1)
    assert node_of_ranks(d.url) == {0: 0}
    assert_greedy(d.url, refs, range(1))
    assert_binds_node_addresses(d)
    assert (d.hosts.node_addr(0), STORE_PORT) in listening(d.procs[0].pid)  # the rendezvous store
    for k in range(NNODES):  # gloo's own listeners (beyond nats and http) are on the node address too
        assert len(listening(d.procs[k].pid)) > (3 if k == 0 else 2)


def test_deepseek_v3_dp_attention_across_nodes(deploy, models, all_refs) -> None:  # noqa: ANN001
    """One DP group per node. Then node 1 dies mid-stream: every request ends, with its greedy
    output or a clear 503 (the world that could take it over is the broken one); node 0 holds the
    world until node 1's launcher is back, then both restart it at a new rendezvous epoch, and
    both DP ranks serve again as new instances. Then node 1's cable is pulled and put back: the
    world breaks and comes back by itself."""
    refs = all_refs["deepseek_v3"]
    d = deploy(models["deepseek_v3"], "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", *FAILURE_FLAGS,
               "--dist-timeout", "6")
    wait_ranks(d.url, 2)
    assert node_of_ranks(d.url) == {0: 0, 1: 1}
    assert_greedy(d.url, refs, range(2))
    assert_binds_node_addresses(d)
    before = loads(d.url)
    long_refs = reference(models["deepseek_v3"], lengths=(9, 9, 9, 9), max_new=LONG_DPA)
    greedy = {"temperature": 0, "max_new_tokens": LONG_DPA, "ignore_eos": True}
    with ThreadPoolExecutor(len(long_refs)) as pool:
        futures = streams_with_node1_killed(pool, d, long_refs, greedy)
        d.wait_log(0, "world schedulers moves to epoch 1", 30)
        time.sleep(1.5)
        assert "starting world schedulers at epoch" not in d.log(0)  # held while node 1 is away
        d.restart_node(1)
        results = [f.result(timeout=150) for f in futures]
    outcomes = []
    for events, (_, expected) in zip(results, long_refs, strict=True):
        final = events[-1]
        if "error" in final:  # a clear 503, never a hang nor a wrong output
            assert final["error"].get("code") == 503 or "503" in str(final["error"]), final
            outcomes.append("503")
        else:
            assert final["output_ids"] == expected, final
            outcomes.append("completed")
    print("requests after node 1 died:", outcomes)
    back = wait_loads(
        d.url, "both DP ranks live again as new instances",
        lambda ls: all(ls[r]["status"] == "live" and ls[r]["instance_id"] != before[r]["instance_id"] for r in (0, 1)), 120,
    )
    assert sorted(back) == [0, 1]
    assert "node 1's launcher started again" in d.log(0)
    assert "starting world schedulers at epoch" in d.log(1)
    assert_greedy(d.url, refs, range(2))
    # node 1's cable, out for a few seconds: the world's collectives fail within --dist-timeout,
    # and once the route heals node 0 restarts the world with node 1, no launcher restarted
    launchers = [p.pid for p in d.procs]
    before = loads(d.url)
    d.hosts.link(1, up=False)
    wait_loads(d.url, "both DP ranks dead while the cable is out",
               lambda ls: all(r["status"] == "dead" for r in ls.values()), 60)
    d.hosts.link(1, up=True)
    wait_loads(
        d.url, "both DP ranks live again after the cable",
        lambda ls: all(ls[r]["status"] == "live" and ls[r]["instance_id"] != before[r]["instance_id"] for r in (0, 1)), 120,
    )
    assert [p.pid for p in d.procs] == launchers and all(p.poll() is None for p in d.procs)
    assert_greedy(d.url, refs, range(2))


def test_deepseek_v3_tp4_dp2_two_ranks_per_node(deploy, models, all_refs) -> None:  # noqa: ANN001
    """Each node holds one whole attention group (2 ranks); the MoE / MLP collectives cross nodes."""
    refs = all_refs["deepseek_v3"]
    d = deploy(models["deepseek_v3"], "--tp-size", "4", "--dp-size", "2", "--enable-dp-attention")
    wait_ranks(d.url, 2)
    assert node_of_ranks(d.url) == {0: 0, 1: 1}
    for k in range(NNODES):
        python = Path(sys.executable).name  # python3 where pytest runs from the venv's script
        assert len([p for p in d.pids(k, python) if "services.scheduler" in cmdline(p)]) == 2
    assert_greedy(d.url, refs, range(2))
    assert_binds_node_addresses(d)


def test_llama_prefill_on_node1_decode_on_node0(deploy, models) -> None:  # noqa: ANN001
    """The decode side (DP rank 0) on node 0, the prefill side (DP rank 1) on node 1: a 300-token
    prompt is prefilled on node 1 and its KV sent to node 0 over the pair the decode rank opens at
    node 1's bootstrap address (node 1's own, resolved by its launcher: no --node-addr is given)."""
    ((prompt, expected),) = reference(models["llama"], lengths=(300,), max_new=12)
    d = deploy(models["llama"], "--prefill-dp-size", "1", "--decode-dp-size", "1",
               "--disaggregation-min-prompt-tokens", "64")
    wait_ranks(d.url, 2)
    assert node_of_ranks(d.url) == {0: 0, 1: 1}
    out = generate(d.url, input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 12, "ignore_eos": True})
    assert out["output_ids"] == expected
    remote = wait_metric(d.url, "dpserve:prefill_requests_total", 1, mode="decode", where="remote")
    assert remote >= 1, d.log_tail()  # prefilled on node 1, not on the decode rank
    connected = re.findall(r"kv pair \S+ connected \(decode side, bootstrap ([\d.]+):\d+\)", d.log(0))
    assert connected and set(connected) == {d.hosts.node_addr(1)}, d.log_tail()
    assert_binds_node_addresses(d)  # the prefill rank's store too, never the wildcard


def test_a_rank_that_keeps_dying_on_node1_ends_every_node(hosts: Hosts, models, tmp_path: Path) -> None:  # noqa: ANN001
    """Node 1's weights are truncated: its rank dies at its start --max-start-failures times, node
    1's launcher gives up naming it with its last log lines, and node 0's launcher ends too, with
    that reason in its log."""
    broken = tmp_path / "broken"
    shutil.copytree(models["llama"], broken)
    (shard,) = broken.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])
    argv = serve_argv(hosts, models["llama"], "--dp-size", "2", "--max-start-failures", "1")
    argv[1][argv[1].index("--model-path") + 1] = str(broken)
    d = Deployment(hosts, tmp_path, argv, wait_healthy=False)  # it is meant to end
    try:
        assert [p.wait(120) for p in d.procs] == [1, 1], d.log_tail()
    finally:
        d.stop()
    assert "scheduler1 keeps dying at its start: 1 death in a row" in d.log(1)
    ended = d.log(0)[d.log(0).index("node 1's launcher ended the deployment: scheduler1 keeps dying"):]
    assert "SafetensorError: Error while deserializing header" in ended, ended[:3000]


def test_llama_dp2_one_replica_per_node(llama_dp2: Deployment, models, all_refs) -> None:  # noqa: ANN001
    refs = all_refs["llama"]
    d = llama_dp2
    assert node_of_ranks(d.url) == {0: 0, 1: 1}
    d.wait_log(0, "DP ranks on each: node 0: [0], node 1: [1]", 10)  # the startup summary
    assert_greedy(d.url, refs, range(2))
    assert_binds_node_addresses(d)
    assert f"started nats=nats://{d.hosts.node_addr(1)}:{NATS_PORT},nats://{d.hosts.node_addr(0)}:{NATS_PORT}" in d.log(1)
    # node 1's nats-server dies: its rank carries on over node 0's server
    (nats1,) = d.pids(1, "nats-server")
    os.kill(nats1, signal.SIGKILL)
    d.wait_log(1, f"nats reconnected url={d.hosts.node_addr(0)}:{NATS_PORT}", 20)
    assert_greedy(d.url, refs[:1], range(1, 2))


def test_llama_dp2_node1_dies_and_its_cable_is_pulled(llama_dp2: Deployment, models) -> None:  # noqa: ANN001
    """Node 1 dies mid-stream (every process at once): its replica's requests migrate to node 0's
    and finish with their greedy output; node 1's launcher comes back and its rank rejoins. Then
    node 1's cable is pulled and put back: its rank is dead while it is out, and serves again
    once the NATS route between the nodes heals, without a restart."""
    d = llama_dp2
    refs = reference(models["llama"], lengths=(7, 7, 7, 7), max_new=LONG)
    before = loads(d.url)
    greedy = {"temperature": 0, "max_new_tokens": LONG, "ignore_eos": True}
    with ThreadPoolExecutor(len(refs)) as pool:
        futures = streams_with_node1_killed(pool, d, refs, greedy)
        results = [f.result(timeout=120) for f in futures]
    for events, (_, expected) in zip(results, refs, strict=True):
        assert events[-1]["output_ids"] == expected, events[-1]
    assert "migrating rid=" in d.log(0)
    d.restart_node(1)
    wait_loads(d.url, "node 1's rank live again as a new instance",
               lambda ls: ls[1]["status"] == "live" and ls[1]["instance_id"] != before[1]["instance_id"], 90)
    prompt, expected = refs[0]
    assert generate(d.url, input_ids=prompt, sampling_params=greedy | {"max_new_tokens": 16}, routed_dp_rank=1)["output_ids"] == expected[:16]
    # the cable
    d.hosts.link(1, up=False)
    wait_loads(d.url, "node 1's rank dead while its cable is out", lambda ls: ls[1]["status"] == "dead", 30)
    out = generate(d.url, input_ids=prompt, sampling_params=greedy | {"max_new_tokens": 16})
    assert out["output_ids"] == expected[:16]  # node 0 serves alone meanwhile
    d.hosts.link(1, up=True)
    wait_loads(d.url, "node 1's rank live again after the cable", lambda ls: ls[1]["status"] == "live", 60)
    assert generate(d.url, input_ids=prompt, sampling_params=greedy | {"max_new_tokens": 16}, routed_dp_rank=1)["output_ids"] == expected[:16]
