"""Colocated against prefill/decode-disaggregated serving at the same process count, each scheduler
pinned to its own core: does a burst of long prompts stall the streams already decoding, and what
does shipping the KV cost?

Per mode, one fresh `dpserve serve` (--torch-threads 1, the same --max-total-tokens and
--chunked-prefill-size):
  colocated       --dp-size P+D
  disaggregated   --prefill-dp-size P --decode-dp-size D
Once the launcher reports every rank up, every thread of scheduler i (a child of the launcher running
`services.scheduler`, in --dp-rank order) is pinned to core i mod nproc; the other services float.
A warm-up of one long (512-token) and one short prompt per scheduler follows, then the workload:
  1. --streams streaming /generate requests of --stream-input-len random token ids (under
     --disaggregation-min-prompt-tokens, so the decode rank prefills them) and at most
     --stream-output-len new tokens (ignore_eos); every event's arrival is recorded;
  2. once every stream has its first token and they have decoded alone for --quiet-s (the
     baseline of their inter-token latency), a Poisson burst (`dpserve bench`'s runner) of
     --burst-prompts distinct random prompts of --burst-input-len tokens at --burst-rate req/s,
     --burst-output-len new tokens each;
  3. when the last burst request completes, the streams are closed (the gateway aborts them;
     --finish-streams lets them run out). A 2048-token prefill takes tens of seconds on one core
     here, so the burst lasts minutes: streams of a few hundred tokens would end before the first
     KV arrives, hence the long default and the close.
The streams' inter-token latency (an event of k tokens after a gap g: k gaps of g / k, as `dpserve
bench`) is reported before the burst (the --quiet-s), over the burst window (the first burst send to
the last burst completion; a gap counts in the phase where it ends) and over the whole run (their
first tokens' spread included); with the burst's TTFT, the wall time, and from the
gateway's /metrics (the change over the workload; a missing metric counts 0) the KV bytes shipped,
the transfer seconds, the cost per shipped prompt token and the dispatcher's remote / local
decisions. The modes alternate order between --repeats.

A 2048-token prefill takes ~30 s on one core of a 2-core VM, and the prefill rank prefills the
prompts that queued meanwhile in one step: the burst's last request waits minutes for its KV. Past
--disaggregation-transfer-timeout (default 300 s) the decode rank prefills it itself, and the
fallbacks column says so.

    .venv/bin/python benchmarks/bench_pd.py [--modes colocated,disaggregated] [--repeats 1]
        [--streams 32] [--stream-output-len 2048] [--burst-prompts 8] [--burst-rate 1.0]
        [--burst-input-len 2048] [--burst-output-len 8] [--serve-args '...']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_peers import DPSERVE, stop  # noqa: E402
from services.bench.backends import SGLangGenerate  # noqa: E402
from services.bench.datasets import BenchRequest, random_dataset  # noqa: E402
from services.bench.report import percentile  # noqa: E402
from services.bench.runner import RequestResult, run, send_one, sse_events  # noqa: E402
from services.launcher.supervisor import free_port, health_ok  # noqa: E402
from shared.checkpoint import resolve_model_path  # noqa: E402
from shared.metrics import SNAPSHOT_INTERVAL  # noqa: E402

MODES = ("colocated", "disaggregated")
# what the table calls a counter of the gateway's /metrics -> (sample name, label filter), summed
# over the samples that match (every instance's). The transfer's are the prefill side's (a decode
# rank counts the same bytes again as it installs them); the failures the decode side's, each a
# request it prefilled itself.
SHIPPED = {"mode": "prefill"}
COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "kv_bytes": ("dpserve:kv_transfer_bytes_total", SHIPPED),
    "kv_tokens": ("dpserve:kv_transfer_tokens_total", SHIPPED),
    "kv_seconds": ("dpserve:kv_transfer_seconds_sum", SHIPPED),
    "transfers": ("dpserve:kv_transfer_seconds_count", SHIPPED),
    "remote": ("dpserve:disaggregation_decisions_total", {"decision": "remote"}),
    "local": ("dpserve:disaggregation_decisions_total", {"decision": "local"}),
    "fallbacks": ("dpserve:kv_transfer_failures_total", {"mode": "decode"}),  # the sender counts them too
}
WARM_UP_LONG = 512  # tokens: over the dispatcher's default 256, so the warm-up ships a KV too


@dataclass
class Stream:
    events: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter(), tokens it added)
    error: str = ""
    finished: bool = False  # it reached its last token (else it failed, or was closed at the burst's end)

    def gaps(self) -> list[tuple[float, float]]:
        """(end of the gap, seconds a token) for every token after the first."""
        out = []
        for (before, _), (at, k) in pairwise(self.events):
            out += [(at, (at - before) / k)] * k
        return out


@dataclass
class Run:
    label: str
    mode: str
    pinning: list[str]
    streams: list[Stream]
    burst: list[RequestResult]
    phases: tuple[float, float, float]  # perf_counter() when every stream had its first token, the burst's
    # first send, its last completion
    wall_s: float
    metrics: dict[str, float]  # COUNTERS' change over the workload

    def itls(self, lo: float = float("-inf"), hi: float = float("inf")) -> list[float]:
        """The streams' gaps that end in [lo, hi]."""
        return [g for s in self.streams for at, g in s.gaps() if lo <= at <= hi]

    @property
    def shipped_tokens(self) -> int:
        """Prompt tokens of the KV the prefill ranks shipped; where they do not count them, the
        burst's share the dispatcher sent to a prefill rank."""
        if self.metrics["kv_tokens"]:
            return round(self.metrics["kv_tokens"])
        total = sum(r.prompt_len for r in self.burst)
        return round(total * min(1.0, self.metrics["remote"] / len(self.burst))) if self.burst else 0


def scrape(url: str) -> dict[str, float]:
    """COUNTERS from the gateway's /metrics (0 when absent)."""
    out = dict.fromkeys(COUNTERS, 0.0)
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            families = list(text_string_to_metric_families(resp.read().decode()))
    except (OSError, ValueError) as e:
        print(f"warning: /metrics unreadable ({e}); its columns read 0", flush=True)
        return out
    for family in families:
        for s in family.samples:
            for key, (name, labels) in COUNTERS.items():
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    out[key] += s.value
    return out


def serve(mode: str, ns: argparse.Namespace, model: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A fresh `dpserve serve` in `mode`, returned once the launcher has printed its summary (every
    rank up) and /health answers."""
    port = free_port()
    layout = (["--dp-size", str(ns.prefill_dp_size + ns.decode_dp_size)] if mode == "colocated" else
              ["--prefill-dp-size", str(ns.prefill_dp_size), "--decode-dp-size", str(ns.decode_dp_size)])
    argv = [*DPSERVE, "serve", "--model-path", model, "--port", str(port), "--torch-threads", "1",
            "--max-total-tokens", str(ns.max_total_tokens), "--chunked-prefill-size", str(ns.chunked_prefill_size),
            "--log-level", "warning", *layout, *ns.serve_args.split()]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ns.start_timeout
    try:
        while not ("dpserve is serving" in log.read_text(errors="replace") and health_ok(url)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{mode} did not start within {ns.start_timeout:.0f}s; see {log}")
            time.sleep(0.5)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def schedulers(launcher: int) -> list[tuple[int, list[str]]]:
    """The launcher's children that run `services.scheduler` as (pid, argv), in global DP rank order."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
            if not stat or int(stat.rpartition(")")[2].split()[1]) != launcher:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode().split("\0")
        except OSError:  # exited meanwhile
            continue
        if "services.scheduler" in argv:
            found.append((int(entry), argv))
    return sorted(found, key=lambda p: (dp_rank(p[1]), p[0]))


def flag(argv: list[str], name: str, default: str = "") -> str:
    return argv[argv.index(name) + 1] if name in argv[:-1] else default


def dp_rank(argv: list[str]) -> int:
    """A scheduler's global DP rank: its side's first (the prefill side follows the decode side's)
    plus its rank within the side."""
    return int(flag(argv, "--dp-rank-base", "0")) + int(flag(argv, "--dp-rank", "0"))


def pin(launcher: int, expected: int) -> list[str]:
    """Every thread of scheduler i to core i mod nproc (threads started later inherit it)."""
    deadline = time.monotonic() + 30
    while len(procs := schedulers(launcher)) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
    cores = os.cpu_count() or 1
    done = []
    for i, (pid, argv) in enumerate(procs):
        threads = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {i % cores})
                threads += 1
            except (ProcessLookupError, FileNotFoundError):
                pass
        role = flag(argv, "--disaggregation-mode", "null")
        done.append(f"scheduler pid {pid} (DP rank {dp_rank(argv)}, mode {role}) -> core {i % cores}, "
                    f"{threads} threads")
    if len(procs) != expected:
        done.append(f"warning: {len(procs)} scheduler processes found, {expected} expected")
    return done


async def warm_up(url: str, ns: argparse.Namespace, vocab: int, n: int) -> None:
    """A long prompt, then a short one, on each of `n` schedulers (as the dispatcher spreads them)."""
    backend = SGLangGenerate()
    async with aiohttp.ClientSession() as session:
        for length in (min(ns.burst_input_len, WARM_UP_LONG), ns.stream_input_len):
            reqs = random_dataset(n, length, 4, 1.0, vocab, seed=ns.seed + 1000 + length)
            for r in await asyncio.gather(*(send_one(session, url, backend, q) for q in reqs)):
                if not r.success:
                    print(f"warning: warm-up request failed: {r.error}", flush=True)


async def workload(url: str, stream_reqs: list[BenchRequest], burst_reqs: list[BenchRequest], ns: argparse.Namespace
                   ) -> tuple[list[Stream], list[RequestResult], tuple[float, float, float], float]:
    """The streams; once every stream has its first token, --quiet-s of their decoding alone, then
    the burst: (streams, burst results, phases as Run's, wall seconds)."""
    backend = SGLangGenerate()
    streams = [Stream() for _ in stream_reqs]
    waiting = len(streams)
    all_started = asyncio.Event()

    def started() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            all_started.set()

    async def one(session: aiohttp.ClientSession, req: BenchRequest, st: Stream) -> None:
        text, tokens = "", 0
        try:
            async with session.post(url + backend.path, json=backend.body(req)) as resp:
                if resp.status != 200:
                    st.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return
                async for event in sse_events(resp):
                    now = time.perf_counter()
                    if "error" in event:
                        st.error = str(event["error"])
                        return
                    delta = backend.delta(event, text, tokens)
                    if delta.tokens > 0:
                        st.events.append((now, delta.tokens))
                        tokens += delta.tokens
                        if len(st.events) == 1:
                            started()
                    text += delta.text
                st.finished = True
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            st.error = repr(e)
        finally:
            if not st.events:  # ended before its first token: the burst does not wait for it
                started()

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(session, r, s)) for r, s in zip(stream_reqs, streams, strict=True)]
        try:
            await asyncio.wait_for(all_started.wait(), ns.first_token_timeout)
        except TimeoutError:
            print(f"warning: {waiting} streams without a first token after {ns.first_token_timeout:.0f}s; "
                  "the burst starts anyway", flush=True)
        started = time.perf_counter()
        await asyncio.sleep(ns.quiet_s)
        b0 = time.perf_counter()
        burst, _ = await run(url, burst_reqs, ns.burst_rate, None, backend, seed=ns.seed)
        b1 = time.perf_counter()
        if not ns.finish_streams:
            for task in tasks:  # closing the connection aborts the request
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return streams, burst, (started, b0, b1), time.perf_counter() - t0


def run_mode(mode: str, label: str, ns: argparse.Namespace, model: str, vocab: int, rep: int, work: Path) -> Run:
    n = ns.prefill_dp_size + ns.decode_dp_size
    proc, url = serve(mode, ns, model, work / f"{mode}-{rep}.log")
    try:
        pinning = pin(proc.pid, n)
        print(f"\n### {label}\n" + "\n".join(f"pinning: {p}" for p in pinning), flush=True)
        asyncio.run(warm_up(url, ns, vocab, n))
        # the same prompts in both modes and repeats; every server starts with an empty cache
        streams = random_dataset(ns.streams, ns.stream_input_len, ns.stream_output_len, 1.0, vocab, ns.seed)
        burst = random_dataset(ns.burst_prompts, ns.burst_input_len, ns.burst_output_len, 1.0, vocab, ns.seed + 1)
        time.sleep(2.5 * SNAPSHOT_INTERVAL)  # the warm-up's counters reach the gateway
        before = scrape(url)
        out = asyncio.run(workload(url, streams, burst, ns))
        time.sleep(2.5 * SNAPSHOT_INTERVAL)
        after = scrape(url)
    finally:
        stop(proc)
    delta = {k: after[k] - before[k] for k in before}
    return Run(label, mode, pinning, *out, metrics=delta)


def ms3(xs: list[float]) -> list[str]:
    return [f"{1000 * percentile(xs, 50):.1f}", f"{1000 * percentile(xs, 99):.1f}", f"{1000 * max(xs):.1f}"] if xs else ["-"] * 3


LATENCY = ("| mode | streams ok | burst ok | streams live at burst end | ITL before burst P50 ms "
           "| ITL before burst P99 ms | ITL in burst P50 ms | ITL in burst P99 ms "
           "| ITL in burst max ms | ITL all P50 ms | ITL all P99 ms | ITL all max ms | burst TTFT P50 ms "
           "| burst TTFT P99 ms | wall s |")
TRANSFER = ("| mode | KV shipped MiB | transfers | transfer s (sum) | shipped prompt tokens | KV bytes / token "
            "| transfer ms / 1k tokens | decisions remote / local | transfer fallbacks |")


def latency_cells(r: Run) -> list[str]:
    ttfts = [x.ttft for x in r.burst if x.success]
    started, b0, b1 = r.phases
    live = sum(1 for s in r.streams if not s.error and (not s.finished or s.events[-1][0] >= b1))
    return [f"{sum(not s.error for s in r.streams)}/{len(r.streams)}", f"{len(ttfts)}/{len(r.burst)}",
            f"{live}/{len(r.streams)}", *ms3(r.itls(started, b0))[:2], *ms3(r.itls(b0, b1)), *ms3(r.itls()),
            *ms3(ttfts)[:2], f"{r.wall_s:.1f}"]


def transfer_cells(r: Run) -> list[str]:
    m = r.metrics
    shipped, seconds, tokens = m["kv_bytes"], m["kv_seconds"], r.shipped_tokens
    per_token = f"{shipped / tokens:.0f}" if shipped and tokens else "n/a"
    per_1k = f"{1e6 * seconds / tokens:.1f}" if seconds and tokens else "n/a"
    return [f"{shipped / 2**20:.1f}", f"{m['transfers']:.0f}", f"{seconds:.3f}", str(tokens), per_token, per_1k,
            f"{m['remote']:.0f} / {m['local']:.0f}", f"{m['fallbacks']:.0f}"]


def report(runs: list[Run]) -> None:
    print("\n1. Latency: the streams' ITL before the burst (--quiet-s), over the burst window and the whole run; "
          "the burst's TTFT\n")
    print(LATENCY + "\n|" + " --- |" * LATENCY.count(" | ") + " --- |")
    for r in runs:
        print(f"| {r.label} | " + " | ".join(latency_cells(r)) + " |")
    print("\n2. KV transfer, the prefill side's, from /metrics (change over the workload)\n")
    print(TRANSFER + "\n|" + " --- |" * TRANSFER.count(" | ") + " --- |")
    for r in runs:
        print(f"| {r.label} | " + " | ".join(transfer_cells(r)) + " |")
    print()
    for r in runs:
        print(f"pinning, {r.label}: " + "; ".join(r.pinning))
    pairs = [(d, c) for d in runs if d.mode == "disaggregated" for c in runs
             if c.mode == "colocated" and c.label.rpartition("#")[2] == d.label.rpartition("#")[2]]
    if not pairs:
        return
    names = LATENCY.split(" | ")[4:]
    print("\n3. Disaggregated / colocated (same repeat)\n")
    print("| repeat | " + " | ".join(names) + "\n|" + " --- |" * (len(names) + 1))
    for d, c in pairs:
        ratios = []
        for a, b in zip(latency_cells(d)[3:], latency_cells(c)[3:], strict=True):
            ratios.append(f"{float(a) / float(b):.2f}" if a != "-" and b != "-" and float(b) else "-")
        print(f"| {d.label.rpartition(' ')[2]} | " + " | ".join(ratios) + " |")


def machine(model: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"machine: {os.cpu_count()} cores ({cpu}), load average {load}; model {model}"


def interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # the finally blocks stop the server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=1, help="the modes' order alternates between repeats")
    p.add_argument("--model-path", default="", help="GGUF file or HF dir (default: dpserve's default model)")
    p.add_argument("--prefill-dp-size", type=int, default=1, help="colocated runs --dp-size prefill + decode")
    p.add_argument("--decode-dp-size", type=int, default=1)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--stream-input-len", type=int, default=64)
    p.add_argument("--stream-output-len", type=int, default=2048,
                   help="at most this many tokens a stream; it is closed when the burst completes")
    p.add_argument("--finish-streams", action="store_true",
                   help="let the streams run to --stream-output-len instead of closing them after the burst")
    p.add_argument("--quiet-s", type=float, default=10.0,
                   help="seconds the streams decode alone (every one past its first token) before the burst")
    p.add_argument("--burst-prompts", type=int, default=8)
    p.add_argument("--burst-rate", type=float, default=1.0, help="Poisson arrivals, requests/s")
    p.add_argument("--burst-input-len", type=int, default=2048)
    p.add_argument("--burst-output-len", type=int, default=8)
    p.add_argument("--max-total-tokens", type=int, default=0,
                   help="each rank's KV pool; 0: every stream and burst prompt at full length, at least 40000")
    p.add_argument("--chunked-prefill-size", type=int, default=8192)
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for serve to report every rank up")
    p.add_argument("--first-token-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--serve-args", default="", help="extra `dpserve serve` flags for both modes")
    ns = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    modes = ns.modes.split(",")
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown --modes {','.join(sorted(unknown))} ({' | '.join(MODES)})")
    if not ns.max_total_tokens:
        need = ns.streams * (ns.stream_input_len + ns.stream_output_len) + ns.burst_prompts * (ns.burst_input_len + ns.burst_output_len)
        ns.max_total_tokens = max(40000, need)
    model = resolve_model_path(ns.model_path)
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    work = Path(tempfile.mkdtemp(prefix="bench_pd_"))
    print(machine(model) + f"; server logs in {work}", flush=True)
    runs: list[Run] = []
    notes: list[str] = []
    for rep in range(ns.repeats):
        for mode in modes if rep % 2 == 0 else modes[::-1]:
            label = f"{mode} #{rep + 1}"
            try:
                runs.append(run_mode(mode, label, ns, model, vocab, rep, work))
            except RuntimeError as e:
                notes.append(f"{label}: {e}")
    report(runs)
    for r in runs:
        for i, s in enumerate(r.streams):
            if s.error:
                notes.append(f"{r.label}: stream {i} failed: {s.error}")
        notes += [f"{r.label}: burst request failed: {x.error}" for x in r.burst if not x.success]
    for n in notes:
        print(f"note: {n}")
    print("\n" + machine(model))


if __name__ == "__main__":
    main()
