"""dp 4 on one node against dp 4 over two nodes, in one run: bench_lb.py's workloads and columns,
and what crossing nodes costs.

The nodes are network namespaces on a bridge (tests/integration/netns.py; root needed). Per
load-balance method, one fresh deployment per layout:
  1 node    `dpserve serve --dp-size 4` in node 0's namespace (its bus on that namespace's loopback)
  2 nodes   `dpserve serve --dp-size 4 --nnodes 2 --node-rank K` in node K's namespace: DP ranks 0-1
            on node 0 with the gateway, tokenizer, dispatcher and detokenizer, ranks 2-3 on node 1;
            one nats-server per node, clustered
The client (bench_lb.py's shared-prefix workload, then `dpserve bench` on its skewed ShareGPT-like
workload) runs in this namespace and reaches node 0's gateway over the bridge in both layouts.
The two layouts alternate order from one method to the next and between repeats of a method.

What crossing costs, measured directly (benchmarks/bus_probes.py):
- bus round trip: NATS request/reply from node 0 to a responder on node 0 and to one on node 1
  (interleaved, TokenizedRequest-sized payload) on the 2-node deployment's own servers, and to one
  on the 1-node deployment's server, idle (after the workloads);
- dispatch latency: from the gateway receiving a request (its `created` stamp) to the request's
  delivery on the bus at its rank's node (a subscriber beside the ranks, on their node's server),
  split by the node of the rank; at idle (sequential 1-token requests routed to each rank) and
  under bench's burst, where the TTFT of the same requests is split the same way.

    sudo .venv/bin/python benchmarks/bench_multinode.py [--methods round_robin,minimum_tokens] \
        [--num-prompts 100] [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_lb import HEADER, Row, add_workload_args, run_workloads, sharegpt_file, table  # noqa: E402
from services.launcher.supervisor import health_ok  # noqa: E402
from services.launcher.tiny_model import create_tiny_model  # noqa: E402
from shared.subjects import Subjects  # noqa: E402
from tests.integration.netns import Hosts, NamespacesUnavailable  # noqa: E402

DP = 4
HTTP_PORT, NATS_PORT, STORE_PORT = 30000, 4222, 29500
PROBES = [sys.executable, str(ROOT / "benchmarks" / "bus_probes.py")]
IDLE_WARMUP, IDLE_PER_RANK = 3, 25


@dataclass
class Deployment:
    """One layout's `dpserve serve` processes (one per node) and the bus taps beside its ranks."""

    hosts: Hosts
    nnodes: int
    work: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    taps: list[subprocess.Popen[bytes]] = field(default_factory=list)
    tap_files: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.hosts.node_addr(0)}:{HTTP_PORT}"

    def nats_url(self, k: int) -> str:
        return f"nats://{self.hosts.node_addr(k) if self.nnodes > 1 else '127.0.0.1'}:{NATS_PORT}"

    def start(self, model: str, method: str, extra: list[str]) -> None:
        for k in reversed(range(self.nnodes)):  # workers first, as an operator would
            argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", model,
                    "--port", str(HTTP_PORT), "--dp-size", str(DP), "--load-balance-method", method,
                    "--torch-threads", "1", "--nats-port", str(NATS_PORT), *extra]
            if self.nnodes > 1:
                argv += ["--nnodes", str(self.nnodes), "--node-rank", str(k),
                         "--dist-init-addr", f"{self.hosts.node_addr(0)}:{STORE_PORT}"]
            else:
                argv += ["--host", self.hosts.node_addr(0)]
            self.procs.insert(0, self.hosts.popen(k, argv, self.work / f"node{k}.log"))
        deadline = time.monotonic() + 300
        while not (health_ok(self.url) and live_ranks(self.url) == DP):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"the {self.nnodes}-node deployment did not start; see {self.work}")
            time.sleep(0.5)

    def start_taps(self) -> dict[int, int]:
        """A tap on each node for the ranks there; returns each DP rank's node."""
        node_of = {s["dp_rank"]: s.get("node_rank", 0) for s in get_json(self.url + "/get_server_info")["internal_states"]}
        for k in range(self.nnodes):
            subjects = [Subjects().sched_req(r) for r, n in sorted(node_of.items()) if n == k]
            out, log = self.work / f"tap{k}.txt", self.work / f"tap{k}.log"
            self.tap_files.append(out)
            self.taps.append(self.hosts.popen(k, [*PROBES, "tap", self.nats_url(k), str(out), *subjects], log))
            wait_ready(log, self.taps[-1])
        return node_of

    def dispatch_latency(self) -> dict[str, tuple[int, float]]:
        """rid -> (dp rank, seconds from the gateway to the rank's node), from the taps' files."""
        out: dict[str, tuple[int, float]] = {}
        for f in self.tap_files:
            for line in f.read_text().splitlines():
                rank, rid, seconds = line.split()
                out[rid] = (int(rank), float(seconds))
        return out

    def stop(self) -> None:
        for p in self.taps + self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.taps + self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def live_ranks(url: str) -> int:
    try:
        return sum(r["status"] == "live" for r in get_json(url + "/get_loads")["ranks"])
    except OSError:
        return 0


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while "ready" not in (log.read_text() if log.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"bus probe did not start; see {log}")
        time.sleep(0.05)


def idle_requests(url: str, ranks: list[int]) -> dict[str, float]:
    """Sequential 1-token requests (16 random prompt ids), IDLE_PER_RANK routed to each rank after
    IDLE_WARMUP unrecorded ones; rid -> the client's latency in seconds."""
    rng = random.Random(0)
    e2e: dict[str, float] = {}
    for r in ranks:
        for i in range(IDLE_WARMUP + IDLE_PER_RANK):
            rid = f"idle-{r}-{i}-{uuid.uuid4().hex[:8]}"
            body = {"rid": rid, "input_ids": [rng.randrange(100, 1000) for _ in range(16)], "routed_dp_rank": r,
                    "sampling_params": {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}}
            req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=30) as resp:
                resp.read()
            if i >= IDLE_WARMUP:
                e2e[rid] = time.perf_counter() - t0
    return e2e


def bus_rtt(d: Deployment, samples: int) -> dict[str, Any]:
    """Request/reply from node 0 to an echo on node 0 and one on node 1, on the deployment's servers."""
    echoes = []
    try:
        for k in range(d.nnodes):
            log = d.work / f"echo{k}.log"
            echoes.append(d.hosts.popen(k, [*PROBES, "echo", d.nats_url(k), f"bench.echo.node{k}"], log))
            wait_ready(log, echoes[-1])
        out = d.work / "rtt.json"
        subjects = [f"bench.echo.node{k}" for k in range(d.nnodes)]
        subprocess.run(["ip", "netns", "exec", d.hosts.node_ns(0), *PROBES, "ping", d.nats_url(0), str(out), *subjects,
                        "--samples", str(samples)], check=True, timeout=600)
        return json.loads(out.read_text())
    finally:
        for p in echoes:
            p.send_signal(signal.SIGTERM)
            p.wait(10)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))] if s else float("nan")


def ms(xs: list[float], q: float) -> str:
    return f"{1000 * pct(xs, q):.2f}" if xs else "-"


@dataclass
class Result:
    label: str
    method: str
    nnodes: int
    rep: int
    row: Row
    node_of: dict[int, int]
    idle_dispatch: dict[int, list[float]]  # node -> seconds
    idle_e2e: dict[int, list[float]]
    burst_dispatch: dict[int, list[float]]
    burst_ttft: dict[int, list[float]]
    wall_s: float


def run_layout(hosts: Hosts, nnodes: int, method: str, rep: int, label: str, model: str, data: Path, ns: argparse.Namespace,
               work: Path, rtts: dict[int, dict[str, Any]]) -> Result:
    t0 = time.monotonic()
    d = Deployment(hosts, nnodes, work)
    try:
        d.start(model, method, ns.serve_args.split())
        node_of = d.start_taps()
        idle = idle_requests(d.url, sorted(node_of))
        record = work / "bench.jsonl"
        row, block = run_workloads(d.url, model, data, ns, label, ["--output-file", str(record), "--output-details"])
        print(f"\n### {label}\n{block}", flush=True)
        if nnodes not in rtts:
            rtts[nnodes] = bus_rtt(d, ns.rtt_samples)
        time.sleep(0.5)  # the taps' last lines
        seen = d.dispatch_latency()
    finally:
        d.stop()
    rec = json.loads(record.read_text().splitlines()[-1])
    res = Result(label, method, nnodes, rep, row, node_of, {}, {}, {}, {}, time.monotonic() - t0)
    for rid, seconds in idle.items():
        if rid in seen:
            rank, dispatch = seen[rid]
            res.idle_dispatch.setdefault(node_of[rank], []).append(dispatch)
            res.idle_e2e.setdefault(node_of[rank], []).append(seconds)
    for rid, ttft in zip(rec["rids"], rec["ttfts"], strict=True):
        if rid in seen and ttft is not None:
            rank, dispatch = seen[rid]
            res.burst_dispatch.setdefault(node_of[rank], []).append(dispatch)
            res.burst_ttft.setdefault(node_of[rank], []).append(ttft)
    return res


def report(results: list[Result], rtts: dict[int, dict[str, Any]]) -> None:
    print("\n1. bench_lb.py's columns\n")
    print(table([r.row for r in results], HEADER.replace("| method |", "| method, layout |", 1)))
    print("\n2. Two nodes over one node (ratio of each column, same method and repeat)\n")
    names = HEADER.split("|")[2:11]
    print("| method |" + "|".join(names) + "|\n|" + " --- |" * 10)
    one_node = {(r.method, r.rep): r for r in results if r.nnodes == 1}
    for two in results:
        one = one_node.get((two.method, two.rep))
        if two.nnodes == 2 and one is not None:
            ratios = [a / b if b else float("nan") for a, b in zip(two.row[1:10], one.row[1:10], strict=True)]
            print(f"| {two.label.replace(', 2 nodes', '')} | " + " | ".join(f"{x:.2f}" for x in ratios) + " |")
    for nnodes, rtt in sorted(rtts.items()):
        print(f"\n3.{nnodes} Bus request/reply round trip from node 0 on the {nnodes}-node deployment's servers, idle "
              f"({rtt['payload_bytes']}-byte payload)\n")
        print("| responder | samples | median us | P90 us | P99 us | mean us |\n| --- | --- | --- | --- | --- | --- |")
        for subject, xs in rtt["rtts"].items():
            where = "node 1, across the route" if subject.endswith("node1") else (
                "node 0, same node" if nnodes > 1 else "node 0, bus on loopback")
            print(f"| {where} | {len(xs)} | {1e6 * pct(xs, 50):.0f} | {1e6 * pct(xs, 90):.0f} | {1e6 * pct(xs, 99):.0f} "
                  f"| {1e6 * statistics.mean(xs):.0f} |")
    print("\n4. Gateway -> rank's node (dispatch latency) and TTFT, by the node of the request's rank\n")
    print("| method, layout | ranks on | idle dispatch median ms | idle dispatch P99 ms | idle 1-token e2e median ms "
          "| burst requests | burst dispatch median ms | burst dispatch P99 ms | burst TTFT median ms | burst TTFT P99 ms |")
    print("|" + " --- |" * 10)
    for r in results:
        for node in sorted(set(r.node_of.values())):
            ranks = ",".join(str(k) for k, n in sorted(r.node_of.items()) if n == node)
            idle, e2e = r.idle_dispatch.get(node, []), r.idle_e2e.get(node, [])
            burst, ttft = r.burst_dispatch.get(node, []), r.burst_ttft.get(node, [])
            print(f"| {r.row[0]} | node {node} (dp {ranks}) | {ms(idle, 50)} | {ms(idle, 99)} | {ms(e2e, 50)} "
                  f"| {len(burst)} | {ms(burst, 50)} | {ms(burst, 99)} | {ms(ttft, 50)} | {ms(ttft, 99)} |")
    print("\nwall time per deployment (start, probes, workloads, stop): "
          + ", ".join(f"{r.row[0]} {r.wall_s:.0f} s" for r in results))


def interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # the finally blocks stop the deployment and remove the namespaces


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="round_robin,minimum_tokens")
    add_workload_args(p, num_prompts=100)  # the --serve-args go to both layouts
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rtt-samples", type=int, default=2000)
    ns = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # even where the shell left SIGINT ignored
        signal.signal(sig, interrupted)
    try:
        hosts = Hosts.create(2)
    except NamespacesUnavailable as e:
        raise SystemExit(f"cannot create network namespaces here: {e}") from e
    t0 = time.monotonic()
    try:
        work = Path(tempfile.mkdtemp(prefix="bench_multinode_"))
        print(f"work dir {work}; nodes {hosts.node_addr(0)}, {hosts.node_addr(1)}", flush=True)
        model = ns.model_path or str(create_tiny_model(work / "tiny", arch="llama", seed=0))
        data = work / "sharegpt_skewed.json"
        sharegpt_file(data, ns.num_prompts * 2, ns.seed)
        results: list[Result] = []
        rtts: dict[int, dict[str, Any]] = {}
        for rep in range(ns.repeats):
            for i, method in enumerate(ns.methods.split(",")):
                # the layouts' order alternates between methods and between repeats of a method
                for nnodes in (1, 2) if (rep + i) % 2 == 0 else (2, 1):
                    label = f"{method}, {nnodes} node{'s' if nnodes > 1 else ''}" + (f" #{rep + 1}" if ns.repeats > 1 else "")
                    run_dir = work / f"{method}-{nnodes}n-{rep}"
                    run_dir.mkdir()
                    results.append(run_layout(hosts, nnodes, method, rep, label, model, data, ns, run_dir, rtts))
        report(results, rtts)
        print(f"\ntotal wall time {time.monotonic() - t0:.0f} s")
    finally:
        hosts.close()


if __name__ == "__main__":
    main()
