"""Metrics: every service publishes snapshots on the bus; the gateway renders them for Prometheus.

A `MetricsSnapshot` is one service instance's current values (counters are cumulative since the
instance started, gauges are current, a histogram is its `_bucket` / `_sum` / `_count` samples).
Each service sends one every `SNAPSHOT_INTERVAL` seconds on `subjects.metrics`; a gateway keeps the
latest per instance, forgets an instance silent for `SNAPSHOT_TTL` seconds, and renders all of them
in the Prometheus text format with `service` and `instance` labels added. So one scrape of any
gateway shows the whole deployment, and no service but the gateway needs an HTTP port.

Names follow SGLang's (`sglang:num_running_reqs` ...) under the `dpserve:` prefix; `FAMILIES`
is the registry of every name with its type and help text.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import msgspec
from msgspec import Struct, field

log = logging.getLogger("metrics")

SNAPSHOT_INTERVAL = 1.0
SNAPSHOT_TTL = 10.0

# name -> (type, help); histograms are listed by their base name.
FAMILIES: dict[str, tuple[str, str]] = {
    # per DP rank, from the load reports the gateway receives
    "dpserve:num_running_reqs": ("gauge", "Requests in the running batch of a DP rank"),
    "dpserve:num_queue_reqs": ("gauge", "Requests waiting in a DP rank's queue"),
    "dpserve:token_usage": ("gauge", "Fraction of a DP rank's KV pool in use"),
    "dpserve:num_used_tokens": ("gauge", "KV slots in use on a DP rank"),
    "dpserve:max_total_num_tokens": ("gauge", "KV pool capacity of a DP rank, in tokens"),
    "dpserve:holding_tokens": ("gauge", "Prompt + generated tokens of the requests a DP rank holds"),
    "dpserve:cache_hit_rate": ("gauge", "Prefix-cache hit rate of a DP rank"),
    "dpserve:load_report_age_seconds": (
        "gauge",
        "Seconds since the gateway received a DP rank's last load report",
    ),
    # per gateway, from the outputs it streams
    "dpserve:gen_throughput": ("gauge", "Generated tokens per second over the last 10 seconds"),
    "dpserve:num_requests_in_progress": ("gauge", "HTTP requests a gateway has in progress"),
    "dpserve:prompt_tokens_total": ("counter", "Prompt tokens of finished requests"),
    "dpserve:generation_tokens_total": ("counter", "Generated tokens"),
    "dpserve:ignored_request_fields_total": (
        "counter",
        "Unknown /generate body fields ignored, by field name",
    ),
    "dpserve:num_requests_total": (
        "counter",
        "Requests that ended, by finish reason (stop, length, abort, error)",
    ),
    "dpserve:time_to_first_token_seconds": ("histogram", "Time to first token"),
    "dpserve:inter_token_latency_seconds": ("histogram", "Time between tokens of a request"),
    "dpserve:e2e_request_latency_seconds": ("histogram", "Time from request to its last token"),
    # dispatcher
    "dpserve:dispatcher_decisions_total": (
        "counter",
        "Requests dispatched, by DP rank and load-balance method",
    ),
    "dpserve:dispatcher_in_flight_requests": ("gauge", "Requests sent to a DP rank and not yet accepted"),
    "dpserve:dispatcher_in_flight_tokens": ("gauge", "Prompt tokens of the in-flight requests of a DP rank"),
    "dpserve:dispatcher_report_age_seconds": (
        "gauge",
        "Seconds since the dispatcher's last load report of a DP rank",
    ),
    "dpserve:dispatcher_rank_live": ("gauge", "1 while a DP rank is live, 0 while dead"),
    "dpserve:dispatcher_dead_ranks": ("gauge", "DP ranks currently dead"),
    "dpserve:dispatcher_pending_requests": ("gauge", "Requests waiting for a live DP rank"),
    "dpserve:disaggregation_decisions_total": (
        "counter",
        "Requests of a disaggregated deployment, by where their prompt is prefilled (remote, local) and why",
    ),
    # prefill/decode disaggregation, per rank
    "dpserve:kv_transfer_bytes_total": ("counter", "KV bytes a prefill rank shipped or a decode rank installed"),
    "dpserve:kv_transfer_tokens_total": ("counter", "Prompt tokens of the KV a rank shipped or installed"),
    "dpserve:kv_transfer_seconds": (
        "histogram",
        "Prefill rank: rows handed to the transfer engine until sent; decode rank: task sent until KV installed",
    ),
    "dpserve:prefill_requests_total": ("counter", "A decode rank's requests by where their prompt was prefilled"),
    "dpserve:kv_transfer_failures_total": (
        "counter",
        "Transfers that failed, by reason (the decode rank then prefills the request itself)",
    ),
    # tokenizer
    "dpserve:tokenizer_requests_total": (
        "counter",
        "Requests a tokenizer handled, by result (ok, rejected, failed)",
    ),
    # every service
    "dpserve:snapshot_age_seconds": ("gauge", "Seconds since a service instance's last metrics snapshot"),
}

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Sample(Struct, array_like=True):
    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


class MetricsSnapshot(Struct, kw_only=True):
    service: str
    instance: str
    samples: list[Sample]


class Histogram:
    """Cumulative buckets, Prometheus-style: `counts[i]` = observations <= `buckets[i]`."""

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self._counts):
            self._counts[i] += 1
        self.count += 1
        self.sum += value

    def samples(self, name: str, labels: dict[str, str] | None = None) -> list[Sample]:
        labels = labels or {}
        out, cumulative = [], 0
        for le, n in zip(self.buckets, self._counts, strict=True):
            cumulative += n
            out.append(Sample(name + "_bucket", cumulative, labels | {"le": _num(le)}))
        out.append(Sample(name + "_bucket", self.count, labels | {"le": "+Inf"}))
        out.append(Sample(name + "_sum", self.sum, labels))
        out.append(Sample(name + "_count", self.count, labels))
        return out


def render(samples: Iterable[Sample]) -> str:
    """The Prometheus text exposition format (0.0.4), grouped by family, with HELP and TYPE."""
    by_family: dict[str, list[Sample]] = {}
    for s in samples:
        by_family.setdefault(_family(s.name), []).append(s)
    lines: list[str] = []
    for family in sorted(by_family):
        kind, help_text = FAMILIES.get(family, ("untyped", ""))
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} {kind}")
        for s in by_family[family]:
            lines.append(f"{s.name}{_labels(s.labels)} {_num(s.value)}")
    return "\n".join(lines) + "\n"


def _family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and FAMILIES.get(base, ("",))[0] == "histogram":
            return base
    return name


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Snapshots:
    """The latest snapshot of every service instance (the gateway's side)."""

    def __init__(self, ttl: float = SNAPSHOT_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._latest: dict[tuple[str, str], tuple[float, MetricsSnapshot]] = {}

    def feed(self, snap: MetricsSnapshot) -> None:
        self._latest[(snap.service, snap.instance)] = (self.clock(), snap)

    async def on_snapshot(self, snap: MetricsSnapshot) -> None:
        """Bus handler for `subjects.metrics`."""
        self.feed(snap)

    def samples(self, skip_instance: str = "") -> list[Sample]:
        """Every live instance's samples, labelled with service and instance."""
        now = self.clock()
        out: list[Sample] = []
        for key, (at, snap) in list(self._latest.items()):
            if now - at > self.ttl:
                del self._latest[key]
                continue
            if snap.instance == skip_instance:
                continue
            who = {"service": snap.service, "instance": snap.instance}
            out.append(Sample("dpserve:snapshot_age_seconds", round(now - at, 3), who))
            out += [Sample(s.name, s.value, s.labels | who) for s in snap.samples]
        return out


class _Publisher(Protocol):
    async def publish(self, subject: str, msg: msgspec.Struct) -> None: ...


async def publish_snapshots(
    bus: _Publisher,
    subject: str,
    service: str,
    instance: str,
    collect: Callable[[], list[Sample]],
    interval: float = SNAPSHOT_INTERVAL,
) -> None:
    """Runs until cancelled: one snapshot of `collect()` every `interval` seconds."""
    while True:
        try:
            await bus.publish(subject, MetricsSnapshot(service=service, instance=instance, samples=collect()))
        except Exception as e:  # a bus hiccup must not end the loop; the next one retries
            log.debug("metrics snapshot not published: %r", e)
        await asyncio.sleep(interval)
