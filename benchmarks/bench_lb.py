"""Load-balance methods on real services: `dpserve serve --dp-size 4`, the tiny model, per method.

1. A skewed workload (ShareGPT-like long-tailed prompt and reply lengths, written to a local
   ShareGPT-format file): `dpserve bench` prints SGLang's "Serving Benchmark Result" block.
2. A shared-prefix workload (groups of requests sharing a long system prompt): the radix-cache hit
   rate, sum(cached_tokens) / sum(prompt_tokens) over the responses' meta_info.

    .venv/bin/python benchmarks/bench_lb.py [--methods round_robin,minimum_tokens] [--num-prompts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from services.launcher.supervisor import free_port, health_ok
from services.launcher.tiny_model import create_tiny_model

ALL = ("round_robin", "total_requests", "total_tokens", "minimum_tokens", "power_of_two", "random", "cache_aware")
CORPUS = Path(__file__).resolve().parent.parent / "services" / "launcher" / "corpus" / "english.txt"


def sharegpt_file(path: Path, n: int, seed: int) -> None:
    """Conversations whose prompt and reply word counts follow a Pareto (long) tail."""
    rng = random.Random(seed)
    words = CORPUS.read_text().split()

    def text(k: int) -> str:
        return " ".join(rng.choices(words, k=k))

    convs = []
    for _ in range(n):
        p = min(int(rng.paretovariate(1.3) * 40), 700)
        r = min(int(rng.paretovariate(1.5) * 12), 300)
        convs.append({"conversations": [{"from": "human", "value": text(p)}, {"from": "gpt", "value": text(r)}]})
    path.write_text(json.dumps(convs))


async def shared_prefix(url: str, groups: int, per_group: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    words = CORPUS.read_text().split()
    systems = [" ".join(rng.choices(words, k=300)) for _ in range(groups)]
    prompts = [(g, systems[g] + " Question: " + " ".join(rng.choices(words, k=12))) for g in range(groups)
               for _ in range(per_group)]
    rng.shuffle(prompts)
    cached = total = failed = 0
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:

        async def one(text: str) -> None:
            nonlocal cached, total, failed
            async with sem:
                body = {"text": text, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
                async with session.post(url + "/generate", json=body) as resp:
                    out = await resp.json()
                    if resp.status != 200:
                        failed += 1
                        return
                    cached += out["meta_info"]["cached_tokens"]
                    total += out["meta_info"]["prompt_tokens"]

        await asyncio.gather(*(one(t) for _, t in prompts))
    return (cached / total if total else 0.0), failed


def serve(model: str, method: str, log: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", model, "--port", str(port),
            "--dp-size", "4", "--load-balance-method", method, "--torch-threads", "1", *extra]
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not health_ok(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server for {method} did not start; see {log}")
        time.sleep(0.3)
    time.sleep(2.0)  # let all four ranks report before the run
    return proc, url


HEADER = ("| method | req/s | tok/s | mean TTFT ms | median TTFT ms | P99 TTFT ms | mean ITL ms | median ITL ms "
          "| P95 ITL ms | P99 ITL ms | shared-prefix hit rate | prefix failures |")
Row = tuple  # (label, 9 numbers in HEADER's order, hit rate, prefix failures)


def run_workloads(url: str, model: str, data: Path, ns: argparse.Namespace, label: str,
                  bench_args: list[str] | None = None) -> tuple[Row, str]:
    """Workload 2 (shared prefix), a flush_cache, then workload 1 through `dpserve bench` against
    the server at `url`: the table row and `dpserve bench`'s result block. `ns` holds the flags
    of main(); `bench_args`: more `dpserve bench` flags (e.g. --output-file)."""
    hit, failed_prefix = asyncio.run(shared_prefix(url, ns.groups, ns.per_group, ns.seed))
    subprocess.run([sys.executable, "-c", "import urllib.request as u; u.urlopen(u.Request("
                    f"'{url}/flush_cache', data=b'', method='POST'))"], check=False)
    out = subprocess.run(
        [sys.executable, "-m", "services.launcher", "bench", "--base-url", url, "--tokenizer", model,
         "--dataset-name", "sharegpt", "--dataset-path", str(data), "--num-prompts", str(ns.num_prompts),
         "--request-rate", str(ns.request_rate), "--seed", str(ns.seed), "--backend", "sglang",
         *(bench_args or [])],
        capture_output=True, text=True, check=True,
    ).stdout
    block = out[out.index("=" * 12) :] if "=" * 12 in out else out

    def num(name: str) -> float:
        m = re.search(re.escape(name) + r":\s+([\d.]+)", block)
        return float(m.group(1)) if m else float("nan")

    row = (label, num("Request throughput (req/s)"), num("Total token throughput (tok/s)"), num("Mean TTFT (ms)"),
           num("Median TTFT (ms)"), num("P99 TTFT (ms)"), num("Mean ITL (ms)"), num("Median ITL (ms)"),
           num("P95 ITL (ms)"), num("P99 ITL (ms)"), hit, failed_prefix)
    return row, block


def table(rows: list[Row], header: str = HEADER) -> str:
    lines = [header, "|" + " --- |" * 12]
    lines += [f"| {r[0]} | " + " | ".join(f"{v:.2f}" for v in r[1:10]) + f" | {r[10]:.1%} | {r[11]} |" for r in rows]
    return "\n".join(lines)


def add_workload_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    """The flags run_workloads reads from its `ns`, and the model and serve flags beside them."""
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=8)
    p.add_argument("--model-path", default="")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--serve-args", default="", help="extra `dpserve serve` flags, e.g. '--balance-abs-threshold 4096'")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default=",".join(ALL))
    add_workload_args(p, num_prompts=200)
    ns = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_lb_"))
    model = ns.model_path or str(create_tiny_model(work / "tiny", arch="llama", seed=0))
    data = work / "sharegpt_skewed.json"
    sharegpt_file(data, ns.num_prompts * 2, ns.seed)
    rows = []
    for method in ns.methods.split(","):
        proc, url = serve(model, method, work / f"{method}.log", ns.serve_args.split())
        try:
            row, block = run_workloads(url, model, data, ns, method)
        finally:
            proc.terminate()
            proc.wait(60)
        print(f"\n### --load-balance-method {method}\n{block}", flush=True)
        rows.append(row)
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
