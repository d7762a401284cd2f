"""DP attention vs plain TP on the tiny MLA model (DeepSeek-V3), both through `dpserve serve`:
KV token capacity (the sum of max_total_num_tokens over DP groups, same per-rank byte budget) and
decode throughput of a concurrent greedy burst.

    .venv/bin/python -m benchmarks.bench_dpa [--requests 16] [--max-new 64] [--kv-cache-bytes 4800000]

Plain TP 2: both ranks hold the same latent cache; TP 2 DP 2 with DP attention: each rank holds
its own group's. Throughput on this CPU box reflects collective and Python overheads, not GPU
memory pressure: the capacity column is the point of DP attention for MLA.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from services.launcher.supervisor import free_port, health_ok
from services.launcher.tiny_model import create_tiny_model

LAYOUTS = {
    "tp 2": ["--tp-size", "2"],
    "tp 2 dp 2 DPA": ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"],
}


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def _states(url: str) -> list[dict]:
    with urllib.request.urlopen(url + "/get_server_info", timeout=10) as resp:
        return json.loads(resp.read())["internal_states"]


def run_layout(model: Path, flags: list[str], groups: int, args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model), "--port", str(port),
            "--torch-threads", "1", "--kv-cache-bytes", str(args.kv_cache_bytes), "--log-level", "warning", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (health_ok(url) and len(_states(url)) >= groups):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"server {flags} did not start")
            time.sleep(0.2)
        states = _states(url)
        prompt = list(range(10, 10 + args.prompt_len))
        sampling = {"temperature": 0, "max_new_tokens": args.max_new, "ignore_eos": True}
        _post(url + "/generate", {"input_ids": prompt, "sampling_params": sampling | {"max_new_tokens": 2}})
        done: list[int] = []

        def one(i: int) -> None:
            out = _post(url + "/generate", {"input_ids": [i % 50 + 5, *prompt], "sampling_params": sampling})
            done.append(out["meta_info"]["completion_tokens"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.requests)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        return {
            "groups": len(states),
            "per_group": min(s["max_total_num_tokens"] for s in states),
            "total": sum(s["max_total_num_tokens"] for s in states),
            "tok_s": sum(done) / elapsed,
            "elapsed": elapsed,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--kv-cache-bytes", type=int, default=4_800_000)
    args = p.parse_args()
    model = Path(tempfile.gettempdir()) / "dpserve-bench-dpa-v3"
    if not (model / "config.json").exists():
        create_tiny_model(model, arch="deepseek_v3")
    print(f"tiny DeepSeek-V3 (MLA + MoE), {args.requests} concurrent requests x {args.max_new} new tokens, "
          f"prompt {args.prompt_len + 1}, KV budget {args.kv_cache_bytes} B per rank")
    print("| layout | DP groups | KV tokens per group | KV tokens total | decode tok/s | wall (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, flags in LAYOUTS.items():
        groups = 2 if "--enable-dp-attention" in flags else 1
        r = run_layout(model, flags, groups, args)
        print(f"| {name} | {r['groups']} | {r['per_group']} | {r['total']} | {r['tok_s']:.0f} | {r['elapsed']:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
