"""The real policy classes and load table against simulated ranks, from 8 to 256 ranks.

Cost model: a rank works off its held tokens at `capacity` tokens/s (shared by its requests);
requests arrive as a Poisson stream with long-tailed lengths; each rank reports every 100 ms
(staggered) and lists what it accepted, like the scheduler does; a dispatched request reaches its
rank after `latency`. Printed per method: dispatch decisions per second of wall time (pick +
in-flight bookkeeping + report handling, i.e. the dispatcher's own work) and the load spread,
max / mean of the ranks' true held tokens, averaged over the run.

    .venv/bin/python benchmarks/simulate_dispatch.py [--ranks 8,64,256] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import heapq
import random
import time
from dataclasses import dataclass, field

from services.dispatcher.loads import LoadTable
from services.dispatcher.policies import POLICIES, make_policy
from shared.messages import LoadReport, TokenizedRequest

REPORT_EVERY = 0.1
TICK = 0.01


@dataclass
class SimRank:
    held: dict[int, int] = field(default_factory=dict)  # dispatch id -> remaining tokens
    arrived: list[int] = field(default_factory=list)  # accepted since the last report
    finished: list[int] = field(default_factory=list)
    seq: int = 0

    def work(self, budget: float) -> None:
        while budget > 0 and self.held:
            share = budget / len(self.held)
            for d in list(self.held):
                self.held[d] -= int(share) + 1
                if self.held[d] <= 0:
                    del self.held[d]
                    self.finished.append(d)
            budget = 0


def run(method: str, num_ranks: int, rate: float, seconds: float, seed: int) -> tuple[float, float, int]:
    rng = random.Random(seed)
    policy = make_policy(method, seed)
    table = LoadTable(dead_after=1.0)
    ranks = [SimRank() for _ in range(num_ranks)]
    for k in range(num_ranks):
        table.on_report(LoadReport(dp_rank=k, seq=0, timestamp=0.0, holding_tokens=0, num_running=0,
                                   num_waiting=0, kv_used=0, kv_total=1, instance_id="s"), now=0.0)
    mean_len = 130.0  # about the mean of the length distribution below (prompt + output)
    capacity = rate * mean_len / num_ranks / 0.8  # 80% utilisation
    prefixes = [[rng.randrange(32000) for _ in range(64)] for _ in range(64)]
    arrivals: list[tuple[float, int, TokenizedRequest]] = []
    t, did = 0.0, 0
    while t < seconds:
        t += rng.expovariate(rate)
        did += 1
        n = min(int(rng.paretovariate(1.3) * 30), 2000)
        ids = rng.choice(prefixes)[: min(n, 64)] + [rng.randrange(32000) for _ in range(max(0, n - 64))]
        arrivals.append((t, did, TokenizedRequest(rid=str(did), gateway_id="g", input_ids=ids, dispatch_id=did)))
    in_transit: list[tuple[float, int, int]] = []  # (arrival at rank, dispatch id, rank)
    lengths = {d: len(r.input_ids) + 64 for _, d, r in arrivals}
    spreads: list[float] = []
    wall = 0.0
    i, now, next_tick = 0, 0.0, 0.0
    while now < seconds:
        next_tick += TICK
        while i < len(arrivals) and arrivals[i][0] <= next_tick:
            _, d, req = arrivals[i]
            t0 = time.perf_counter()
            rank = policy.pick(req, table.live_ranks())
            table.add_in_flight(rank.dp_rank, req, now=now)
            policy.on_dispatched(req, rank.dp_rank)
            wall += time.perf_counter() - t0
            heapq.heappush(in_transit, (arrivals[i][0] + 0.002, d, rank.dp_rank))
            i += 1
        now = next_tick
        while in_transit and in_transit[0][0] <= now:
            _, d, k = heapq.heappop(in_transit)
            ranks[k].held[d] = lengths[d]
            ranks[k].arrived.append(d)
        for k, r in enumerate(ranks):
            r.work(capacity * TICK)
            if int(now / TICK) % int(REPORT_EVERY / TICK) == k % int(REPORT_EVERY / TICK):
                r.seq += 1
                rep = LoadReport(dp_rank=k, seq=r.seq, timestamp=now, holding_tokens=sum(r.held.values()),
                                 num_running=len(r.held), num_waiting=0, kv_used=0, kv_total=1,
                                 accepted=r.arrived, finished=r.finished, instance_id="s")
                r.arrived, r.finished = [], []
                t0 = time.perf_counter()
                table.on_report(rep, now=now)
                wall += time.perf_counter() - t0
        loads = [sum(r.held.values()) for r in ranks]
        mean = sum(loads) / len(loads)
        if mean > 0 and now > 0.2 * seconds:
            spreads.append(max(loads) / mean)
    return i / wall if wall else float("inf"), sum(spreads) / max(1, len(spreads)), i


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="8,64,256")
    p.add_argument("--max-rate", type=float, default=10_000)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--methods", default=",".join(m for m in POLICIES if m != "shortest_queue"))
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args()
    print("| ranks | req/s | method | requests | decisions/s | load spread max/mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for num_ranks in (int(x) for x in ns.ranks.split(",")):
        rate = min(ns.max_rate, 40.0 * num_ranks)
        for method in ns.methods.split(","):
            dps, spread, n = run(method, num_ranks, rate, ns.seconds, ns.seed)
            print(f"| {num_ranks} | {rate:.0f} | {method} | {n} | {dps:,.0f} | {spread:.2f} |", flush=True)


if __name__ == "__main__":
    main()
