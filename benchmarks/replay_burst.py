"""Replays the burst of a `bench_lb_sim.py` DP-attention run through the cost model, to say what the
placement alone is worth: where the dispatcher sent each request (its debug lines in the serve
log), each group's queue prefilled in lockstep chunks of `--chunk` tokens per group (SGLang's
8192 / 16 groups), every request arriving at t=0, decode tokens ignored. Prints each method's
prefill-done times (the TTFT of an idle cluster hit by the burst) under two gather modes:

  sum  the feed-forward and DP attention's gather/scatter run over the groups' tokens as they are
       (SGLang's SUM_LEN, what it uses for prefill batches; what `--device sim` models)
  max  every group's tokens padded to the largest group's before the all-gather (SGLang's
       MAX_LEN), so a step costs as if every group had the largest group's tokens

    .venv/bin/python benchmarks/replay_burst.py WORKDIR [--config dsv3-dpa16] [--chunk 512]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_lb_sim import CONFIGS  # noqa: E402
from services.scheduler.sim.cost import HARDWARE, CostModel, ModelShape, Row  # noqa: E402

DISPATCH = re.compile(r"dispatch rid=\w+ id=\d+ tokens=(\d+) -> dp(\d+)")


def queues(log: Path, groups: int) -> list[list[int]]:
    """Each group's prompt lengths in arrival order; the first dispatch is the bench's warmup."""
    out: list[list[int]] = [[] for _ in range(groups)]
    for m in list(DISPATCH.finditer(log.read_text(errors="replace")))[1:]:
        out[int(m.group(2))].append(int(m.group(1)))
    return out


def replay(cost: CostModel, qs: list[list[int]], chunk: int, mode: str) -> tuple[list[float], int]:
    """Prefill-done time of every request, and the lockstep steps it took."""
    left = [list(q) for q in qs]
    done: list[float] = []
    t, steps = 0.0, 0
    while any(left):
        rows: list[list[Row]] = []
        finished: list[int] = []
        for q in left:
            budget, mine = chunk, []
            while q and budget > 0:
                n = min(q[0], budget)
                mine.append(Row(n, n))
                budget -= n
                q[0] -= n
                if q[0] == 0:
                    q.pop(0)
                    finished.append(1)
            rows.append(mine)
        counts = [sum(r.extend for r in mine) for mine in rows]
        if mode == "max":
            counts = [max(counts)] * len(counts)
        shared = cost.step([], counts)
        t += max(cost.attention_time(mine) for mine in rows) + shared.ffn_s + shared.comm_s + shared.overhead_s
        steps += 1
        done += [t] * len(finished)
    return done, steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work", type=Path)
    p.add_argument("--config", default="dsv3-dpa16")
    p.add_argument("--chunk", type=int, default=8192 // 16)
    ns = p.parse_args()
    ckpt, flags, groups = CONFIGS[ns.config]
    tp = int(flags[flags.index("--tp-size") + 1])
    hw = HARDWARE[flags[flags.index("--sim-hardware") + 1]]
    cost = CostModel(ModelShape.from_path(ns.work / ckpt), hw, tp, tp // groups, groups)
    logs = sorted(ns.work.glob(f"{ns.config}-*.log"), key=lambda f: f.stem != f"{ns.config}-round_robin")
    print("| method | max group tokens | mode | steps | mean ms | P99 ms | P99 / rr | mean / rr |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    base: dict[str, tuple[float, float]] = {}
    for log in logs:
        method = log.stem.removeprefix(f"{ns.config}-")
        qs = queues(log, groups)
        for mode in ("sum", "max"):
            done, steps = replay(cost, qs, ns.chunk, mode)
            mean, p99 = 1000 * statistics.mean(done), 1000 * statistics.quantiles(done, n=100)[98]
            rr = base.setdefault(mode, (mean, p99))
            print(f"| {method} | {max(map(sum, qs))} | {mode} | {steps} | {mean:.0f} | {p99:.0f} | "
                  f"{p99 / rr[1]:.2f} | {mean / rr[0]:.2f} |")


if __name__ == "__main__":
    main()
