"""Overload: offer 10x the sustainable request rate to a `dpserve serve` with bounded queues.

Measures the sustainable rate first (closed loop, `--max-running-requests` clients), then sends
open-loop arrivals at FACTOR x that rate for DURATION seconds and prints accepted / rejected
counts, p50 / p99 latency of the accepted ones, and the peak RSS of every service process.

    .venv/bin/python benchmarks/bench_overload.py [--duration 20] [--factor 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from services.launcher.supervisor import free_port, health_ok
from services.launcher.tiny_model import create_tiny_model

BODY = {"text": "overload benchmark", "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}}


def children(root: int) -> dict[int, str]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read()
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == root:
            name = next((c.decode().split(".")[-1] for c in cmd if c.startswith(b"services.")), "")
            name = name or ("nats-server" if b"nats-server" in cmd[0] else cmd[0].decode())
            if name == "scheduler" and b"--dp-rank" in cmd:
                name += cmd[cmd.index(b"--dp-rank") + 1].decode()
            out[int(pid)] = name
    return out


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


async def one(session: aiohttp.ClientSession, url: str) -> tuple[int, float, bool]:
    t0 = time.monotonic()
    async with session.post(url + "/generate", json=BODY) as resp:
        await resp.read()
        return resp.status, time.monotonic() - t0, "Retry-After" in resp.headers


async def sustainable_rate(url: str, clients: int, seconds: float) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            status, _, _ = await one(session, url)
            done += status == 200

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return done / seconds


async def offer(url: str, rate: float, seconds: float, pids: dict[int, str]) -> tuple[list, dict[str, float]]:
    peak: dict[str, float] = {}
    results: list[tuple[int, float, bool]] = []
    stop = False

    async def sample() -> None:
        while not stop:
            for pid, name in pids.items():
                peak[name] = max(peak.get(name, 0.0), rss_mib(pid))
            await asyncio.sleep(0.25)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        sampler = asyncio.create_task(sample())

        async def record() -> None:
            try:
                results.append(await one(session, url))
            except aiohttp.ClientError:
                results.append((-1, 0.0, False))

        tasks = []
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            tasks.append(asyncio.create_task(record()))
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
        stop = True
        await sampler
    return results, peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--max-running-requests", type=int, default=4)
    parser.add_argument("--max-queued-requests", type=int, default=32)
    parser.add_argument("--max-queued-requests-per-rank", type=int, default=8)
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = create_tiny_model(Path(tmp) / "tiny", arch="llama", seed=0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model), "--port", str(port),
                "--torch-threads", "1", "--max-running-requests", str(ns.max_running_requests),
                "--max-queued-requests", str(ns.max_queued_requests),
                "--max-queued-requests-per-rank", str(ns.max_queued_requests_per_rank), "--log-level", "warning"]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not health_ok(url):
                if proc.poll() is not None:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
            rate = asyncio.run(sustainable_rate(url, ns.max_running_requests, 5.0))
            offered = rate * ns.factor
            results, peak = asyncio.run(offer(url, offered, ns.duration, children(proc.pid)))
        finally:
            proc.terminate()
            proc.wait(30)
    accepted = sorted(t for s, t, _ in results if s == 200)
    rejected = [(s, ra) for s, _, ra in results if s in (429, 503)]
    other = [s for s, _, _ in results if s not in (200, 429, 503)]
    q = statistics.quantiles(accepted, n=100) if len(accepted) >= 2 else [float("nan")] * 99
    print(f"sustainable rate (closed loop, {ns.max_running_requests} clients): {rate:.1f} req/s")
    print(f"offered: {offered:.1f} req/s for {ns.duration:.0f}s = {len(results)} requests")
    print("| accepted (200) | rejected 503 | rejected 429 | with Retry-After | other | p50 accepted (s) | p99 accepted (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    n503 = sum(s == 503 for s, _ in rejected)
    n429 = sum(s == 429 for s, _ in rejected)
    with_ra = sum(ra for _, ra in rejected)
    print(f"| {len(accepted)} | {n503} | {n429} | {with_ra}/{len(rejected)} | {len(other)} | {q[49]:.3f} | {q[98]:.3f} |")
    print()
    print("| service | peak RSS (MiB) |")
    print("| --- | --- |")
    for name, mib in sorted(peak.items()):
        print(f"| {name} | {mib:.0f} |")


if __name__ == "__main__":
    main()
