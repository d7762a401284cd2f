"""The gateway's metrics and `GET /metrics`.

What the gateway measures itself, from the traffic it carries:
- it is told when each request leaves and when it is aborted (`on_start`, `on_abort`: the request
  lifecycle of `GatewayState`) and sees each step come back (`observe(batch)` on the output
  subscription), so it times TTFT, inter-token latency and end-to-end latency exactly as a client
  would see them;
- it receives every DP leader's `LoadReport` (`on_report`), which carries the scheduler's gauges
  (running / waiting requests, KV used / total, cache hit rate).

Everything else (dispatcher, tokenizers, other gateways) arrives as `MetricsSnapshot`s on
`subjects.metrics` (shared/metrics.py); `/metrics` renders all of it.

Invariant: `_started` holds only rids of requests in progress: an entry leaves on the request's
final step, on its error, on its abort, or when it was never published (`forget`).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

from aiohttp import web

from shared.messages import LoadReport, RequestError, TextBatch
from shared.metrics import Histogram, Sample, Snapshots, render

THROUGHPUT_WINDOW = 10.0  # seconds
MAX_IGNORED_FIELDS = 100  # distinct label values of ignored_request_fields_total


class GatewayMetrics:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.ttft = Histogram()
        self.itl = Histogram()
        # a disaggregated deployment's requests, by where their prompt was prefilled (remote, local)
        self.ttft_by_prefill: dict[str, Histogram] = {}
        self.itl_by_prefill: dict[str, Histogram] = {}
        self.e2e = Histogram()
        self.finished: Counter[str] = Counter()  # finish type -> requests
        self.ignored_fields: Counter[str] = Counter()  # unknown /generate field -> requests that sent it
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._started: dict[str, float] = {}  # rid -> clock() when published
        self._last_token: dict[str, float] = {}  # rid -> clock() of its latest step with tokens
        self._prefill: dict[str, str] = {}  # rid -> where its prompt was prefilled (disaggregated only)
        self._recent: deque[tuple[float, int]] = deque()  # (clock(), tokens) within the window
        self.reports: dict[int, tuple[float, LoadReport]] = {}  # dp_rank -> (received, report)
        self.snapshots = Snapshots()

    # --- events -----------------------------------------------------------------------------

    def on_start(self, rid: str) -> None:
        self._started[rid] = self.clock()

    def on_abort(self, rid: str) -> None:
        if self._started.pop(rid, None) is not None:
            self.finished["abort"] += 1
        self._last_token.pop(rid, None)
        self._prefill.pop(rid, None)

    def observe(self, batch: TextBatch) -> None:
        now = self.clock()
        for out in batch.outputs:
            started = self._started.get(out.rid)
            if started is None:  # another gateway's, or already ended
                continue
            if isinstance(out, RequestError):
                self.finished["error"] += 1
                self.forget(out.rid)
                continue
            n = len(out.new_ids)
            if n:
                last = self._last_token.get(out.rid)
                if last is None:
                    if out.prefill:
                        self._prefill[out.rid] = out.prefill
                    self._ttft(out.rid).observe(now - started)
                else:
                    itl = self._itl(out.rid)
                    for _ in range(n):  # a step with n tokens: n gaps of equal share
                        itl.observe((now - last) / n)
                self._last_token[out.rid] = now
                self.generation_tokens += n
                self._recent.append((now, n))
            if out.finish is not None:
                self.e2e.observe(now - started)
                self.prompt_tokens += out.prompt_tokens
                self.finished[out.finish.type] += 1
                self.forget(out.rid)

    def _ttft(self, rid: str) -> Histogram:
        where = self._prefill.get(rid)
        return self.ttft if where is None else self.ttft_by_prefill.setdefault(where, Histogram())

    def _itl(self, rid: str) -> Histogram:
        where = self._prefill.get(rid)
        return self.itl if where is None else self.itl_by_prefill.setdefault(where, Histogram())

    def on_ignored_fields(self, names: list[str]) -> None:
        """Counts the unknown fields a request sent; the names are the client's, so at most
        MAX_IGNORED_FIELDS distinct ones are kept (the rest count as "other")."""
        for name in names:
            key = name[:64]
            known = key in self.ignored_fields or len(self.ignored_fields) < MAX_IGNORED_FIELDS
            self.ignored_fields[key if known else "other"] += 1

    def forget(self, rid: str) -> None:
        """Stops timing `rid` without counting it."""
        self._started.pop(rid, None)
        self._last_token.pop(rid, None)
        self._prefill.pop(rid, None)

    async def on_report(self, report: LoadReport) -> None:
        self.reports[report.dp_rank] = (self.clock(), report)

    # --- reading ----------------------------------------------------------------------------

    def gen_throughput(self) -> float:
        now = self.clock()
        while self._recent and now - self._recent[0][0] > THROUGHPUT_WINDOW:
            self._recent.popleft()
        return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW

    def local_samples(self, in_progress: int) -> list[Sample]:
        """What this gateway measured (also what it publishes in its own snapshot)."""
        out = [
            Sample("dpserve:gen_throughput", round(self.gen_throughput(), 3)),
            Sample("dpserve:num_requests_in_progress", in_progress),
            Sample("dpserve:prompt_tokens_total", self.prompt_tokens),
            Sample("dpserve:generation_tokens_total", self.generation_tokens),
        ]
        out += [
            Sample("dpserve:num_requests_total", n, {"finish": k}) for k, n in sorted(self.finished.items())
        ]
        out += [
            Sample("dpserve:ignored_request_fields_total", n, {"field": k})
            for k, n in sorted(self.ignored_fields.items())
        ]
        out += self.ttft.samples("dpserve:time_to_first_token_seconds")
        out += self.itl.samples("dpserve:inter_token_latency_seconds")
        for where, h in sorted(self.ttft_by_prefill.items()):
            out += h.samples("dpserve:time_to_first_token_seconds", {"prefill": where})
        for where, h in sorted(self.itl_by_prefill.items()):
            out += h.samples("dpserve:inter_token_latency_seconds", {"prefill": where})
        out += self.e2e.samples("dpserve:e2e_request_latency_seconds")
        return out

    def rank_samples(self) -> list[Sample]:
        """The schedulers' gauges, from the latest load report of each DP rank."""
        now = self.clock()
        out: list[Sample] = []
        for dp_rank, (at, r) in sorted(self.reports.items()):
            rank = {"dp_rank": str(dp_rank)}
            out += [
                Sample("dpserve:num_running_reqs", r.num_running, rank),
                Sample("dpserve:num_queue_reqs", r.num_waiting, rank),
                Sample("dpserve:token_usage", round(r.kv_used / r.kv_total, 6) if r.kv_total else 0.0, rank),
                Sample("dpserve:num_used_tokens", r.kv_used, rank),
                Sample("dpserve:max_total_num_tokens", r.kv_total, rank),
                Sample("dpserve:holding_tokens", r.holding_tokens, rank),
                Sample("dpserve:cache_hit_rate", r.cache_hit_rate, rank),
                Sample("dpserve:load_report_age_seconds", round(now - at, 3), rank),
            ]
        return out


def add_metrics_routes(
    app: web.Application, metrics: GatewayMetrics, gateway_id: str, in_progress: Callable[[], int]
) -> None:
    async def handle(request: web.Request) -> web.Response:
        me = {"service": "gateway", "instance": gateway_id}
        local = [Sample(s.name, s.value, s.labels | me) for s in metrics.local_samples(in_progress())]
        body = render(metrics.rank_samples() + local + metrics.snapshots.samples(skip_instance=gateway_id))
        return web.Response(
            text=body,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    app.router.add_get("/metrics", handle)
