"""The seed's load-balance experiment on simulated GPUs (`--device sim`): per deployment and
load-balance method, a fresh `dpserve serve`, 100 ShareGPT-like requests at once (SGLang's
`bench_serving --num-prompt 100`, request rate inf), SGLang's columns and the ratios to
round_robin, next to the seed's published numbers (DeepSeek-R1, tp 16 + DP attention, 2 nodes).

Deployments (--configs):
  dsv3-dpa16   DeepSeek-V3 shapes (fp8), tp 16 with DP attention (16 DP groups): 16 scheduler
               processes in ONE torch.distributed (gloo) world, each step in lockstep, on H20s
  llama-dpN    Llama-70B shapes (fp8), N independent replicas of one H200 each (N = 16, 32, 64)

The scheduler processes share this machine's CPUs, and their own work per step (bus, schedule,
plan, update, the lockstep's collectives) is real time the modeled GPU time does not include.
--time-scale S makes every simulated step sleep S times its modeled time, so that work weighs
S times less; every latency printed is divided by S (throughput multiplied) back to GPU time.
A sim step starts when the previous one ended, so the schedulers' CPU work between steps runs
inside the modeled time (as under SGLang's overlap scheduler); where it outlasts the scaled
modeled time the run is stretched. The per-step CPU time and the stretch (wall / modeled x S,
from the schedulers' "sim stats" lines) are printed with the results.

Besides SGLang's columns it prints where the requests went (the dispatcher's debug lines joined
with each request's TTFT by request id): requests and prompt tokens per rank, the rank of the worst
TTFT, and each rank's prefix-cache hit rate. `--workload shared-prefix` runs SGLang's
generated-shared-prefix dataset instead (16 system prompts of 2048 tokens), for cache_aware.

    .venv/bin/python benchmarks/bench_lb_sim.py [--configs dsv3-dpa16,llama-dp16] \
        [--methods round_robin,minimum_tokens] [--workload sharegpt|shared-prefix] [--time-scale 3]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.launcher.supervisor import free_port  # noqa: E402
from services.scheduler.sim.checkpoints import write_sim_checkpoint  # noqa: E402

CORPUS = ROOT / "services" / "launcher" / "corpus" / "english.txt"
# SGLang's published result (DeepSeek-R1, tp 16 + DP attention, 2 nodes, bench_serving --num-prompt 100)
SEED = {"round_robin": {"mean_ttft_ms": 6945, "p99_ttft_ms": 14878, "p99_itl_ms": 1461},
        "minimum_tokens": {"mean_ttft_ms": 4768, "p99_ttft_ms": 9761, "p99_itl_ms": 865}}
CONFIGS: dict[str, tuple[str, list[str], int]] = {  # name -> (sim checkpoint, serve flags, DP ranks)
    "dsv3-dpa16": ("deepseek-v3", ["--tp-size", "16", "--dp-size", "16", "--enable-dp-attention",
                                   "--sim-hardware", "h20"], 16),
    **{f"llama-dp{n}": ("llama-70b", ["--dp-size", str(n), "--sim-hardware", "h200"], n) for n in (16, 32, 64)},
}
METHODS = ("round_robin", "random", "total_requests", "total_tokens", "minimum_tokens", "power_of_two", "cache_aware")
COLUMNS = [("mean_ttft_ms", "mean TTFT ms"), ("median_ttft_ms", "median TTFT ms"), ("p99_ttft_ms", "P99 TTFT ms"),
           ("mean_itl_ms", "mean ITL ms"), ("p99_itl_ms", "P99 ITL ms"), ("output_throughput", "out tok/s")]


def sharegpt_like(path: Path, n: int, seed: int) -> None:
    """Conversations with long-tailed (Pareto) prompt and reply lengths, ShareGPT's shape after
    SGLang's filter (prompt <= 1024 tokens, prompt + reply <= 2048): most short, a few long."""
    rng = random.Random(seed)
    words = CORPUS.read_text().split()
    convs = []
    for _ in range(n):
        p = min(int(rng.paretovariate(1.1) * 50), 600)
        r = min(int(rng.paretovariate(1.2) * 70), 700)
        convs.append({"conversations": [{"from": "human", "value": " ".join(rng.choices(words, k=p))},
                                        {"from": "gpt", "value": " ".join(rng.choices(words, k=r))}]})
    path.write_text(json.dumps(convs))


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def serve(model: Path, flags: list[str], ranks: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model), "--port", str(port),
            "--device", "sim", "--torch-threads", "1", "--context-length", "4096", "--log-level", "debug", *flags]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            live = [r for r in get_json(url + "/get_loads")["ranks"] if r["status"] == "live"]
            if len(live) == ranks:
                return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; see {log}")
        time.sleep(1.0)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def sim_stats(log: Path, scale: float) -> dict[str, float]:
    """Over the ranks' "sim stats" lines (logged every 5 s while a rank steps): mean CPU ms per busy
    step, mean modeled ms per step, and the stretch: wall time between a rank's first and last
    line over the modeled time it slept in between (x scale); 1.0 means the schedulers' CPU
    work hid inside the modeled steps, 1.3 that the run went 30% slower than modeled."""
    lines: dict[str, list[tuple[float, int, float, float]]] = {}
    pattern = (r"(\d\d):(\d\d):(\d\d) INFO scheduler\[(\d+)\] sim stats steps=(\d+) modeled_s=([\d.]+) "
               r"busy_steps=\d+ busy_cpu_s=[\d.]+ cpu_per_step_ms=([\d.]+)")
    for m in re.finditer(pattern, log.read_text(errors="replace")):
        t = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3))
        lines.setdefault(m.group(4), []).append((t, int(m.group(5)), float(m.group(6)), float(m.group(7))))
    if not lines:
        return {"cpu_ms_per_step": float("nan"), "modeled_ms_per_step": float("nan"), "stretch": float("nan")}
    stretch = [(v[-1][0] - v[0][0]) / ((v[-1][2] - v[0][2]) * scale) for v in lines.values() if v[-1][2] > v[0][2]]
    return {
        "cpu_ms_per_step": statistics.mean(v[-1][3] for v in lines.values()),
        "modeled_ms_per_step": statistics.mean(1000 * v[-1][2] / v[-1][1] for v in lines.values()),
        "stretch": statistics.mean(stretch) if stretch else float("nan"),
    }


def placement(log: Path, rec: dict[str, Any], ranks: int) -> dict[str, Any]:
    """Where the dispatcher sent each measured request (its debug lines) joined with the request's
    TTFT: per rank the requests, prompt tokens and worst TTFT; the spread of those over the ranks."""
    sent = {m.group(1): (int(m.group(3)), int(m.group(2)))
            for m in re.finditer(r"dispatch rid=(\w+) id=\d+ tokens=(\d+) -> dp(\d+)", log.read_text(errors="replace"))}
    per_rank: dict[int, list[tuple[int, float]]] = {r: [] for r in range(ranks)}
    for rid, ttft in zip(rec["rids"], rec["ttfts"], strict=True):
        if rid in sent and ttft is not None:
            rank, tokens = sent[rid]
            per_rank[rank].append((tokens, ttft))
    reqs = [len(v) for v in per_rank.values()]
    tokens = [sum(t for t, _ in v) for v in per_rank.values()]
    worst = max((max((f for _, f in v), default=0.0), r) for r, v in per_rank.items())
    return {"reqs_per_rank": (min(reqs), max(reqs)), "tokens_per_rank": (min(tokens), max(tokens)),
            "tokens_cv": statistics.pstdev(tokens) / statistics.mean(tokens) if sum(tokens) else 0.0,
            "worst_ttft_rank": (worst[1], len(per_rank[worst[1]]), tokens[worst[1]]), "joined": sum(reqs)}


def hit_rates(url: str) -> list[float]:
    return [r["cache_hit_rate"] for r in get_json(url + "/get_loads")["ranks"]]


def run_one(config: str, method: str, ns: argparse.Namespace, work: Path, data: Path) -> dict[str, Any]:
    ckpt, flags, ranks = CONFIGS[config]
    model = work / ckpt
    log = work / f"{config}-{method}.log"
    t0 = time.monotonic()
    proc, url = serve(model, flags + ["--load-balance-method", method, "--sim-time-scale", str(ns.time_scale)],
                      ranks, log)
    started = time.monotonic() - t0
    out = work / f"{config}-{method}.jsonl"
    try:
        time.sleep(2.0)
        subprocess.run(
            [sys.executable, "-m", "services.launcher", "bench", "--base-url", url, "--tokenizer", str(model),
             *workload_flags(ns, data), "--request-rate", "inf", "--seed", str(ns.seed), "--output-file", str(out),
             "--output-details"],
            check=True, capture_output=True, cwd=ROOT, timeout=1800,
        )
        rates = hit_rates(url)
        time.sleep(STATS_WAIT_S)  # one more "sim stats" line from every rank
    finally:
        stop(proc)
    rec = json.loads(out.read_text().splitlines()[-1])
    s = ns.time_scale
    row = {k: rec[k] / s for k, _ in COLUMNS if k != "output_throughput"}
    row["output_throughput"] = rec["output_throughput"] * s
    row["completed"] = rec.get("completed")
    row |= sim_stats(log, ns.time_scale)
    row["startup_s"] = started
    row["hit_rate"] = (min(rates), statistics.mean(rates), max(rates))
    row |= placement(log, rec, ranks)
    print(f"{config} {method}: {json.dumps(row)}", flush=True)
    return row


STATS_WAIT_S = 6.0


def workload_flags(ns: argparse.Namespace, data: Path) -> list[str]:
    if ns.workload == "sharegpt":
        return ["--dataset-name", "sharegpt", "--dataset-path", str(data), "--num-prompts", str(ns.num_prompts)]
    # SGLang's generated-shared-prefix: groups of prompts behind one long system prompt each
    return ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(GSP_GROUPS),
            "--gsp-prompts-per-group", str(ns.num_prompts // GSP_GROUPS), "--gsp-system-prompt-len", "2048",
            "--gsp-question-len", "128", "--gsp-output-len", "256"]


GSP_GROUPS = 16


def placement_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| method | requests per rank (min-max) | prompt tokens per rank (min-max) | tokens CV | "
             "rank of the worst TTFT: requests, tokens | cache hit rate per rank (min / mean / max) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, r in rows.items():
        w = r["worst_ttft_rank"]
        h = r["hit_rate"]
        lines.append(f"| {method} | {r['reqs_per_rank'][0]}-{r['reqs_per_rank'][1]} | {r['tokens_per_rank'][0]}-"
                     f"{r['tokens_per_rank'][1]} | {r['tokens_cv']:.2f} | dp{w[0]}: {w[1]}, {w[2]} | "
                     f"{h[0]:.2f} / {h[1]:.2f} / {h[2]:.2f} |")
    return "\n".join(lines)


def table(config: str, rows: dict[str, dict[str, Any]], scale: float) -> str:
    base = rows.get("round_robin")
    head = "| method | " + " | ".join(h for _, h in COLUMNS) + " | P99 TTFT / rr | P99 ITL / rr | mean TTFT / rr "
    head += "| sched CPU ms/step | modeled ms/step | stretch |"
    lines = [f"**{config}** (latencies in simulated GPU time; --sim-time-scale {scale})", "", head,
             "|" + " --- |" * (len(COLUMNS) + 7)]
    for method, r in rows.items():
        ratio = [f"{r[k] / base[k]:.2f}" if base else "-" for k in ("p99_ttft_ms", "p99_itl_ms", "mean_ttft_ms")]
        lines.append(f"| {method} | " + " | ".join(f"{r[k]:.0f}" for k, _ in COLUMNS) + " | " + " | ".join(ratio)
                     + f" | {r['cpu_ms_per_step']:.2f} | {r['modeled_ms_per_step']:.1f} | {r['stretch']:.2f} |")
    if config.startswith("dsv3"):
        for method, v in SEED.items():
            rr = SEED["round_robin"]
            lines.append(f"| seed {method} (R1, 16 GPUs) | {v['mean_ttft_ms']} | - | {v['p99_ttft_ms']} | - | "
                         f"{v['p99_itl_ms']} | - | {v['p99_ttft_ms'] / rr['p99_ttft_ms']:.2f} | "
                         f"{v['p99_itl_ms'] / rr['p99_itl_ms']:.2f} | {v['mean_ttft_ms'] / rr['mean_ttft_ms']:.2f} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--configs", default="dsv3-dpa16,llama-dp16")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--workload", choices=("sharegpt", "shared-prefix"), default="sharegpt")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--time-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", default="")
    ns = p.parse_args()
    work = Path(ns.work or tempfile.mkdtemp(prefix="bench_lb_sim_"))
    work.mkdir(parents=True, exist_ok=True)
    for ckpt in {CONFIGS[c][0] for c in ns.configs.split(",")}:
        write_sim_checkpoint(work / ckpt, ckpt)
    data = work / "sharegpt_like.json"
    sharegpt_like(data, ns.num_prompts * 3, ns.seed)
    print(f"work dir {work}", flush=True)
    for config in ns.configs.split(","):
        rows = {m: run_one(config, m, ns, work, data) for m in ns.methods.split(",")}
        print("\n" + table(config, rows, ns.time_scale) + "\n\n" + placement_table(rows) + "\n", flush=True)


if __name__ == "__main__":
    main()
