"""A disaggregated rank's counters, published as MetricsSnapshots (shared/metrics.py) by its leader."""

from __future__ import annotations

from collections import Counter

from shared.metrics import Histogram, Sample

TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class DisaggMetrics:
    def __init__(self, dp_rank: int, mode: str) -> None:
        self.labels = {"dp_rank": str(dp_rank), "mode": mode}
        self.bytes = 0  # KV bytes shipped (prefill) or installed (decode)
        self.tokens = 0  # prompt tokens those bytes hold
        self.seconds = Histogram(TRANSFER_BUCKETS)  # prefill: rows handed over -> sent; decode: task -> installed
        self.prefills: Counter[str] = Counter()  # decode: where its prompts were prefilled (remote, local)
        self.failures: Counter[str] = Counter()  # why a transfer failed
        self.retries = 0  # decode: tasks sent to a second prefill rank after the first failed

    def samples(self) -> list[Sample]:
        out = [
            Sample("dpserve:kv_transfer_bytes_total", self.bytes, self.labels),
            Sample("dpserve:kv_transfer_tokens_total", self.tokens, self.labels),
            *self.seconds.samples("dpserve:kv_transfer_seconds", self.labels),
            Sample("dpserve:kv_transfer_retries_total", self.retries, self.labels),
        ]
        out += [Sample("dpserve:prefill_requests_total", n, self.labels | {"where": w}) for w, n in sorted(self.prefills.items())]
        out += [Sample("dpserve:kv_transfer_failures_total", n, self.labels | {"reason": r})
                for r, n in sorted(self.failures.items())]
        return out
