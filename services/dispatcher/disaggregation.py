"""Where a request's prompt is prefilled when the deployment has prefill ranks (Dynamo's
disaggregated router's decision, SGLang's PD placement).

The decode rank is the load-balance method's pick among the ranks that decode. Then:
- local (the decode rank prefills it): a migrated request (it resumes from its output), a prompt with
  fewer than --disaggregation-min-prompt-tokens tokens the decode rank has not cached (sending
  its KV costs more than computing it), or every prefill rank holding more than
  --disaggregation-max-prefill-queue tokens (the queue would cost more than the prefill);
- remote otherwise, on the prefill rank that cached the longest part of the prompt when that
  covers more than --cache-threshold of it, else the one with the fewest tokens queued: what it
  reported plus the tasks sent its way that its reports have not yet listed as taken.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from services.dispatcher.loads import RankState
from services.dispatcher.prefix_tree import PrefixTree
from shared.messages import LoadReport, TokenizedRequest
from shared.metrics import Sample

TASK_TTL = 30.0  # seconds a task counts toward its prefill rank's queue without being reported taken


@dataclass(frozen=True)
class DisaggregationConfig:
    min_prompt_tokens: int = 256
    max_prefill_queue: int = 65536  # 0: no limit
    cache_threshold: float = 0.5
    max_tree_size: int = 1 << 22


class Disaggregation:
    def __init__(self, config: DisaggregationConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.tree = PrefixTree(config.max_tree_size)  # the prompts each prefill rank prefilled
        self.tasks: dict[int, dict[int, tuple[int, float]]] = {}  # prefill rank -> dispatch id -> (tokens, sent)
        self.decisions: Counter[tuple[str, str]] = Counter()  # (remote | local, reason)

    def queued(self, rank: RankState) -> int:
        """Tokens a prefill rank has to get through: reported, plus tasks not yet reported taken."""
        now = self.clock()
        tasks = self.tasks.get(rank.dp_rank, {})
        for d in [d for d, (_, sent) in tasks.items() if now - sent > TASK_TTL]:
            del tasks[d]
        return rank.holding_tokens + sum(t for t, _ in tasks.values())

    def place(self, req: TokenizedRequest, decode_cached: int, prefill: list[RankState]) -> int | None:
        """The prefill rank for `req` (None: its decode rank prefills it); `decode_cached`: prompt
        tokens the decode rank is thought to have cached."""
        cfg = self.config
        if req.resume_output_ids:
            return self._decide(req, None, "resumed")
        if len(req.input_ids) - decode_cached < cfg.min_prompt_tokens:
            return self._decide(req, None, "short")
        by_rank = {r.dp_rank: r for r in prefill}
        match = self.tree.match(req.input_ids, by_rank.keys())
        if match.length / len(req.input_ids) > cfg.cache_threshold:
            candidates, reason = [by_rank[k] for k in match.ranks], "cached"
        else:
            candidates, reason = prefill, "least_queued"
        best = min(candidates, key=lambda r: (self.queued(r), r.dp_rank))
        if cfg.max_prefill_queue and self.queued(best) > cfg.max_prefill_queue:
            return self._decide(req, None, "prefill_queue_full")
        self.tree.insert(req.input_ids, best.dp_rank)
        self.tasks.setdefault(best.dp_rank, {})[req.dispatch_id] = (len(req.input_ids), self.clock())
        req.prefill_bootstrap = best.report.bootstrap_addr if best.report else ""
        req.prefill_instance = best.instance_id
        return self._decide(req, best.dp_rank, reason)

    def _decide(self, req: TokenizedRequest, dp_rank: int | None, reason: str) -> int | None:
        req.prefill_dp_rank = dp_rank
        if dp_rank is None:
            req.prefill_bootstrap = req.prefill_instance = ""
        self.decisions["local" if dp_rank is None else "remote", reason] += 1
        return dp_rank

    def on_report(self, report: LoadReport) -> None:
        tasks = self.tasks.get(report.dp_rank)
        if tasks:
            for d in report.tasks_accepted:
                tasks.pop(d, None)

    def forget(self, dp_rank: int) -> None:
        """A prefill rank died or restarted: its cache and queue are gone."""
        self.tree.forget(dp_rank)
        self.tasks.pop(dp_rank, None)

    def samples(self) -> list[Sample]:
        return [Sample("dpserve:disaggregation_decisions_total", n, {"decision": d, "reason": r})
                for (d, r), n in sorted(self.decisions.items())]
