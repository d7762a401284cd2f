"""Soak: mixed streaming load at `--dp-size 3` for N minutes, a random rank SIGKILLed every 30 s.

Starts `dpserve serve`, runs `--concurrency` client loops of streaming (and some non-streaming)
/generate requests of mixed lengths, and every `--kill-every` s SIGKILLs one random scheduler rank
(the launcher restarts it). Prints requests sent, completed, failed with a clear error (an HTTP
error or an SSE error event with a message), lost (no answer, a cut stream, a client timeout: must
be 0), and latency percentiles.

    .venv/bin/python benchmarks/soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.launcher.supervisor import free_port, health_ok  # noqa: E402
from tests.integration.failures import service_pids  # noqa: E402


def one_request(url: str, rng: random.Random, timeout: float) -> tuple[str, float]:
    """('ok' | 'error' | 'lost', seconds)."""
    stream = rng.random() < 0.8
    body = {
        "text": f"soak {rng.randrange(10**6)} " + "word " * rng.randrange(1, 60),
        "sampling_params": {"max_new_tokens": rng.choice([8, 32, 64, 128]), "temperature": rng.choice([0, 0.8])},
        "stream": stream,
    }
    req = urllib.request.Request(url + "/generate", json.dumps(body).encode(), {"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if not stream:
                out = json.loads(resp.read())
                return ("ok" if "meta_info" in out else "lost"), time.monotonic() - t0
            last = None
            for line in resp:
                line = line.strip()
                if line == b"data: [DONE]":
                    kind = "error" if last is not None and "error" in last else "ok"
                    if kind == "error" and not last["error"].get("message"):
                        kind = "lost"
                    return kind, time.monotonic() - t0
                if line.startswith(b"data: "):
                    last = json.loads(line[6:])
            return "lost", time.monotonic() - t0  # cut without [DONE]
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:  # noqa: BLE001
            message = ""
        return ("error" if message else "lost"), time.monotonic() - t0
    except Exception:  # noqa: BLE001 - timeouts, resets: the request was lost
        return "lost", time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--dp-size", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--kill-every", type=float, default=30.0)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="client timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", default="/tmp/dpserve-soak.log")
    ns = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "services.launcher", "serve", "--port", str(port), "--dp-size", str(ns.dp_size),
            "--torch-threads", "1", "--request-timeout", str(ns.request_timeout - 10)]
    log = open(ns.log, "wb")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not health_ok(url):
            if server.poll() is not None or time.monotonic() > deadline:
                print("server did not start; see", ns.log)
                return 1
            time.sleep(0.5)
        rng = random.Random(ns.seed)
        counts = {"sent": 0, "ok": 0, "error": 0, "lost": 0}
        latencies: list[float] = []
        lock = threading.Lock()
        end = time.monotonic() + ns.minutes * 60

        def client(seed: int) -> None:
            r = random.Random(seed)
            while time.monotonic() < end:
                with lock:
                    counts["sent"] += 1
                kind, took = one_request(url, r, ns.request_timeout)
                with lock:
                    counts[kind] += 1
                    if kind == "ok":
                        latencies.append(took)

        threads = [threading.Thread(target=client, args=(ns.seed * 1000 + i,)) for i in range(ns.concurrency)]
        for t in threads:
            t.start()
        kills = 0
        next_kill = time.monotonic() + ns.kill_every
        while time.monotonic() < end:
            time.sleep(0.5)
            if time.monotonic() >= next_kill:
                rank = rng.randrange(ns.dp_size)
                pids = service_pids(server.pid, "services.scheduler", dp_rank=str(rank))
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                kills += bool(pids)
                print(f"[{time.strftime('%H:%M:%S')}] killed dp_rank={rank} pids={pids} so far {counts}", flush=True)
                next_kill += ns.kill_every
        for t in threads:
            t.join()
        latencies.sort()

        def pct(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

        text = Path(ns.log).read_text(errors="replace")
        print()
        print(f"soak: {ns.minutes:g} min, dp_size={ns.dp_size}, concurrency={ns.concurrency}, "
              f"a random rank SIGKILLed every {ns.kill_every:g}s ({kills} kills)")
        print("| sent | completed | failed (clear error) | lost | p50 s | p99 s | max s | migrated | re-run/resubmitted |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        print(f"| {counts['sent']} | {counts['ok']} | {counts['error']} | {counts['lost']} | {pct(0.5):.2f} | "
              f"{pct(0.99):.2f} | {latencies[-1] if latencies else float('nan'):.2f} | "
              f"{text.count('mode=migrate')} | {text.count('mode=stall') + text.count('submitting it again')} |")
        return 0 if counts["lost"] == 0 else 2
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
