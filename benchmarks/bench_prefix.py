"""Shared-prefix workload: prefix-cache hit rate and mean TTFT with the radix cache on and off.

N requests = one of G long shared prefixes (a system prompt) + a short unique question; they
arrive in waves of `--wave` while earlier ones still run. TTFT = time from `add` to the step
that emitted the first token, in the engine (no HTTP).

    .venv/bin/python -m benchmarks.bench_prefix [--size big] [--requests 64]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.bench_engine import common_args, load, make_engine, model_dir, params_count
from services.scheduler.request import Req
from shared.messages import SamplingParams


def run(engine, reqs: list[Req], wave: int) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
    pending = list(reqs)
    added: dict[str, float] = {}
    ttft: dict[str, float] = {}
    t_start = time.perf_counter()
    while pending or engine.has_work:
        for r in pending[:wave]:
            engine.add(r)
            added[r.rid] = time.perf_counter()
        pending = pending[wave:]
        step = engine.step()
        now = time.perf_counter()
        for r in step.reqs:
            if r.output_ids and r.rid not in ttft:
                ttft[r.rid] = now - added[r.rid]
    total = time.perf_counter() - t_start
    return engine.cache.hit_rate, sum(ttft.values()) / len(ttft), total


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--wave", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, config, tok = load(model_dir(args))
    rng = random.Random(0)
    prefixes = [
        [rng.randrange(4, config.vocab_size) for _ in range(args.prefix_len)] for _ in range(args.prefixes)
    ]

    def workload() -> list[Req]:
        r2 = random.Random(1)
        return [
            Req(
                f"r{i}",
                "g",
                prefixes[i % args.prefixes] + [r2.randrange(4, config.vocab_size) for _ in range(32)],
                SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True),
            )
            for i in range(args.requests)
        ]

    print(
        f"{params_count(model) / 1e6:.1f}M params, {args.requests} requests, {args.prefixes} prefixes of "
        f"{args.prefix_len} tokens + 32 unique, 8 output tokens, waves of {args.wave}"
    )
    print("| radix cache | hit rate | mean TTFT (ms) | total (s) |")
    print("| --- | ---: | ---: | ---: |")
    for radix in (True, False):
        engine = make_engine(
            model, config, tok, pool=65536, disable_radix_cache=not radix, max_running_requests=32
        )
        hit, ttft, total = run(engine, workload(), args.wave)
        print(f"| {'on' if radix else 'off'} | {hit:.1%} | {ttft * 1000:.0f} | {total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
