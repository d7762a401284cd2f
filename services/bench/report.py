"""The "Serving Benchmark Result" block (SGLang's bench_serving layout) and its JSONL record."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from services.bench.runner import RequestResult

WIDTH = 50


@dataclass(frozen=True)
class Summary:
    backend: str
    request_rate: float
    max_concurrency: int | None
    completed: int
    failed: int
    duration: float
    total_input: int
    total_output: int
    total_output_retokenized: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    total_throughput: float
    concurrency: float
    mean_e2e_latency_ms: float
    median_e2e_latency_ms: float
    mean_ttft_ms: float
    median_ttft_ms: float
    p99_ttft_ms: float
    mean_itl_ms: float
    median_itl_ms: float
    p95_itl_ms: float
    p99_itl_ms: float
    max_itl_ms: float


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(
    results: list[RequestResult],
    duration: float,
    backend: str,
    request_rate: float,
    max_concurrency: int | None,
    retokenize: Callable[[str], int] | None = None,
) -> Summary:
    ok = [r for r in results if r.success]
    ms = 1000.0
    e2e = [r.latency * ms for r in ok]
    ttft = [r.ttft * ms for r in ok]
    itl = [x * ms for r in ok for x in r.itls]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_len for r in ok)
    retok = sum(retokenize(r.text) for r in ok) if retokenize else total_out
    d = max(duration, 1e-9)

    def mean(v: list[float]) -> float:
        return statistics.fmean(v) if v else 0.0

    return Summary(
        backend=backend,
        request_rate=request_rate,
        max_concurrency=max_concurrency,
        completed=len(ok),
        failed=len(results) - len(ok),
        duration=duration,
        total_input=total_in,
        total_output=total_out,
        total_output_retokenized=retok,
        request_throughput=len(ok) / d,
        input_throughput=total_in / d,
        output_throughput=total_out / d,
        total_throughput=(total_in + total_out) / d,
        concurrency=sum(r.latency for r in ok) / d,
        mean_e2e_latency_ms=mean(e2e),
        median_e2e_latency_ms=percentile(e2e, 50),
        mean_ttft_ms=mean(ttft),
        median_ttft_ms=percentile(ttft, 50),
        p99_ttft_ms=percentile(ttft, 99),
        mean_itl_ms=mean(itl),
        median_itl_ms=percentile(itl, 50),
        p95_itl_ms=percentile(itl, 95),
        p99_itl_ms=percentile(itl, 99),
        max_itl_ms=max(itl, default=0.0),
    )


def format_block(s: Summary) -> str:
    def row(label: str, value: Any) -> str:
        if isinstance(value, float):
            return f"{label:<40} {value:<10.2f}"
        return f"{label:<40} {value!s:<10}"

    def title(text: str, fill: str) -> str:
        return f"{text:{fill}^{WIDTH}}"

    lines = [
        title(" Serving Benchmark Result ", "="),
        row("Backend:", s.backend),
        row("Traffic request rate:", "inf" if s.request_rate == float("inf") else s.request_rate),
        row("Max request concurrency:", s.max_concurrency if s.max_concurrency else "not set"),
        row("Successful requests:", s.completed),
        row("Benchmark duration (s):", s.duration),
        row("Total input tokens:", s.total_input),
        row("Total generated tokens:", s.total_output),
        row("Total generated tokens (retokenized):", s.total_output_retokenized),
        row("Request throughput (req/s):", s.request_throughput),
        row("Input token throughput (tok/s):", s.input_throughput),
        row("Output token throughput (tok/s):", s.output_throughput),
        row("Total token throughput (tok/s):", s.total_throughput),
        row("Concurrency:", s.concurrency),
        title("End-to-End Latency", "-"),
        row("Mean E2E Latency (ms):", s.mean_e2e_latency_ms),
        row("Median E2E Latency (ms):", s.median_e2e_latency_ms),
        title("Time to First Token", "-"),
        row("Mean TTFT (ms):", s.mean_ttft_ms),
        row("Median TTFT (ms):", s.median_ttft_ms),
        row("P99 TTFT (ms):", s.p99_ttft_ms),
        title("Inter-Token Latency", "-"),
        row("Mean ITL (ms):", s.mean_itl_ms),
        row("Median ITL (ms):", s.median_itl_ms),
        row("P95 ITL (ms):", s.p95_itl_ms),
        row("P99 ITL (ms):", s.p99_itl_ms),
        row("Max ITL (ms):", s.max_itl_ms),
        "=" * WIDTH,
    ]
    return "\n".join(lines)


def details(results: list[RequestResult]) -> dict[str, list[Any]]:
    """SGLang's `--output-details` lists, one entry per request in send order (seconds), plus the
    server's request ids (`rids`, /generate only) to join them with server logs."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len if r.success else 0 for r in results],
        "ttfts": [r.ttft if r.success else None for r in results],
        "itls": [r.itls for r in results],
        "errors": [r.error for r in results],
        "rids": [r.rid for r in results],
    }


def jsonl_record(s: Summary, config: dict[str, Any]) -> str:
    record = asdict(s)
    if record["request_rate"] == float("inf"):
        record["request_rate"] = "inf"  # JSON has no infinity
    return json.dumps(config | record)
