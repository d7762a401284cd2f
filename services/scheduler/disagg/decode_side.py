"""A decode rank's part: for a request the dispatcher gave a prefill rank, reserve its KV here
(after this rank's own prefix match), start the pair and send the PrefillTask; when the PrefillDone
says the rows are coming, post their receive; once they are in, install them and decode on.

When the rows will not come from that prefill rank (it stopped reporting, the pair broke, the task
was refused) and the transfer timeout has time left, the task goes once more, to another live
prefill instance (the least loaded by its last report), keeping the reservation. Otherwise (no
other prefill rank, a second failure, `--disaggregation-transfer-timeout` passed) the reserved
slots are freed and the request is prefilled here instead, so nothing hangs and nothing leaks. A
failed pair is never reused: the next task to that prefill rank names a new one.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.scheduler.disagg.metrics import DisaggMetrics
from services.scheduler.disagg.transfer import KVPoll, KVReceiver, Peer, TransferEngine
from services.scheduler.engine import Engine
from services.scheduler.request import Req
from shared.bounded import BoundedDict
from shared.bus import Bus
from shared.messages import LoadReport, PrefillDone, PrefillTask, TokenizedRequest, TokenOutput
from shared.subjects import Subjects

TAGS = 1 << 31  # gloo tags are 32-bit
PREFILL_INSTANCES = 1024  # prefill instances whose reports this rank remembers (forged ones must not grow it)
RETRYABLE = ("transfer", "refused", "prefill_rank_lost")  # failures of one prefill rank, not of the request


@dataclass
class Heard:
    report: LoadReport  # a prefill instance's last report
    seen: float  # time.monotonic() it arrived


@dataclass
class Pending:
    req: Req
    msg: TokenizedRequest  # what the dispatcher sent (a retry sends it to another prefill rank)
    prefill_dp_rank: int
    prefill_instance: str
    skip: int
    tag: int
    nbytes: int  # the rows' size this rank expects
    peer: Peer
    started: float  # time.monotonic() the task was sent
    done: PrefillDone | None = None
    rx: KVReceiver | None = None  # posted when the PrefillDone says the rows are coming
    retried: bool = False  # a task went to a second prefill rank


class DecodeSide:
    def __init__(self, bus: Bus, subjects: Subjects, transfer: TransferEngine, engine: Engine, dp_rank: int,
                 instance_id: str, timeout_s: float, dead_after_s: float, min_prompt_tokens: int, metrics: DisaggMetrics,
                 wake: Callable[[], None], log: logging.Logger) -> None:
        self.bus = bus
        self.subjects = subjects
        self.transfer = transfer
        self.engine = engine
        self.dp_rank = dp_rank
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self.dead_after_s = dead_after_s
        self.min_prompt_tokens = min_prompt_tokens  # fewer uncached tokens than this: prefill here
        self.metrics = metrics
        self.wake = wake  # thread-safe: the step loop runs again (an idle leader waits for input)
        self.log = log
        self.heard: BoundedDict[str, Heard] = BoundedDict(PREFILL_INSTANCES)  # by prefill instance
        self.pending: dict[str, Pending] = {}
        self.tags = itertools.count(1)
        # prefill instance -> its current pair's generation; pair key -> the pair (rows of a request
        # given up are drained on it). Bounded: restarted prefill ranks leave entries behind
        self.generations: BoundedDict[str, int] = BoundedDict(PREFILL_INSTANCES)
        self.peers: BoundedDict[str, Peer] = BoundedDict(PREFILL_INSTANCES)

    # --- bus handlers ----------------------------------------------------------------------------

    async def on_load(self, report: LoadReport) -> None:
        if report.mode == "prefill" and report.instance_id:
            self.heard[report.instance_id] = Heard(report, time.monotonic())

    async def on_done(self, msg: PrefillDone) -> None:
        pending = self.pending.get(msg.rid)
        if pending is None or pending.tag != msg.tag or msg.rid not in self.engine.transferring:
            self._drain(msg)  # a task this rank gave up on
            return
        pending.done = msg
        if msg.ok:
            pending.rx = self.transfer.receiver(pending.peer, pending.tag, pending.nbytes)
            pending.rx.result.add_done_callback(lambda _: self.wake())
        self.wake()

    def _drain(self, msg: PrefillDone) -> None:
        """Receives rows nobody waits for any more, so the prefill rank's send completes instead of
        timing out (which would break the pair under every other transfer on it)."""
        peer = self.peers.get(msg.pair_key)
        most = self.engine.pool.size * self.engine.pool.row_bytes()  # no request of this rank ships more
        if msg.ok and peer is not None and 0 < msg.tag < TAGS and 0 <= msg.nbytes <= most:
            self.transfer.receiver(peer, msg.tag, msg.nbytes)

    # --- requests --------------------------------------------------------------------------------

    def _lost(self, instance: str) -> bool:
        """Whether that prefill instance stopped reporting. One this rank has not heard of is not
        lost (the dispatcher named it, having heard it; the pair's canary tells a dead one). Reports
        of other instances for its rank change nothing: a restarted rank's old instance stops
        reporting, and a forged report must not fail a live one."""
        heard = self.heard.get(instance)
        return heard is not None and time.monotonic() - heard.seen > self.dead_after_s

    def _another_prefill_rank(self, tried: str) -> LoadReport | None:
        """The least loaded live prefill instance other than `tried`, by its last report (the
        newest instance of each rank)."""
        now = time.monotonic()
        newest: dict[int, Heard] = {}
        for instance, heard in self.heard.items():
            rank = heard.report.dp_rank
            if instance != tried and now - heard.seen <= self.dead_after_s and heard.report.bootstrap_addr and (
                    rank not in newest or heard.seen > newest[rank].seen):
                newest[rank] = heard
        live = [h.report for h in newest.values()]
        return min(live, key=lambda r: (r.holding_tokens + r.num_waiting, r.dp_rank)) if live else None

    async def add(self, req: Req, msg: TokenizedRequest) -> None:
        """A request with a prefill rank: reserved here and sent there; without one (or when that
        cannot be), prefilled here."""
        req.prefill_where = "local"  # until a prefill rank's KV is installed
        if msg.prefill_dp_rank is None:
            self.metrics.prefills["local"] += 1
            self.engine.add(req)
            return
        prefill_instance, addr = msg.prefill_instance, msg.prefill_bootstrap
        if not addr or self._lost(prefill_instance):
            self._count_failure("unknown_prefill_rank", req, f"prefill rank {msg.prefill_dp_rank} is not live")
            self.engine.add(req)
            return
        skip = self.engine.add_remote(req)
        if skip is None:  # ended, or prefilled here (no room for its KV now)
            if not req.finished:
                self.metrics.prefills["local"] += 1
            return
        if len(req.input_ids) - skip < self.min_prompt_tokens:  # this rank had it cached after all
            self.engine.prefill_locally(req)
            self.metrics.prefills["local"] += 1
            return
        nbytes = (len(req.input_ids) - skip) * self.engine.pool.row_bytes()
        pending = Pending(req, msg, msg.prefill_dp_rank, prefill_instance, skip, 0, nbytes, Peer(addr, ""),
                          time.monotonic())
        await self._send_task(pending)

    async def _send_task(self, p: Pending) -> None:
        """Starts the pair with `p`'s prefill instance and sends it the task, under a new tag."""
        key = self._pair_key(p.prefill_instance, p.peer.addr)
        p.tag = next(self.tags) % (TAGS - 1) + 1  # 0 is the pair's canary
        p.peer = self.peers[key] = Peer(p.peer.addr, key)
        self.transfer.connect(p.peer)  # set up while the prefill rank works
        self.pending[p.req.rid] = p
        task = PrefillTask(req=p.msg, decode_dp_rank=self.dp_rank, pair_key=key, tag=p.tag, skip=p.skip,
                           nbytes=p.nbytes, prefill_instance=p.prefill_instance)
        await self.bus.publish(self.subjects.sched_prefill(p.prefill_dp_rank), task)

    def _pair_key(self, prefill_instance: str, addr: str) -> str:
        """The pair to use with that prefill instance: the current one, or a new one if it broke."""
        generation = self.generations.setdefault(prefill_instance, 0)
        key = f"{self.instance_id}-{prefill_instance}-{generation}"
        if self.transfer.broken(Peer(addr, key)):
            self.generations[prefill_instance] = generation + 1
            key = f"{self.instance_id}-{prefill_instance}-{generation + 1}"
        return key

    async def poll(self) -> list[TokenOutput]:
        """Installs the transfers that completed, sends the failed ones to another prefill rank
        once or prefills them here; the outputs of the installed requests (their first token)."""
        outputs: list[TokenOutput] = []
        now = time.monotonic()
        for rid, p in list(self.pending.items()):
            if rid not in self.engine.transferring:  # aborted meanwhile: its slots are free already
                del self.pending[rid]
                continue
            if p.rx is not None and p.rx.poll() == KVPoll.SUCCESS:
                del self.pending[rid]
                assert p.done is not None and p.done.output is not None
                outputs += self.engine.install_remote(p.req, p.rx.buffer, p.skip, p.done.output, p.done.rng_state,
                                                      p.done.cached_tokens)
                self.transfer.release(p.rx)
                self.metrics.prefills["remote"] += 1
                self.metrics.bytes += p.rx.nbytes
                self.metrics.tokens += len(p.req.input_ids) - p.skip
                self.metrics.seconds.observe(now - p.started)
                continue
            failure = self._failure(p, now)
            if failure is not None:
                reason, message = failure
                del self.pending[rid]
                if reason == "timeout":  # the pair may be stuck: the next task starts a new one
                    self.generations[p.prefill_instance] = self.generations.get(p.prefill_instance, 0) + 1
                retry = reason in RETRYABLE and not p.retried and now - p.started < self.timeout_s
                other = self._another_prefill_rank(p.prefill_instance) if retry else None
                if other is None:
                    self.engine.prefill_locally(p.req)
                    self._count_failure(reason, p.req, message)
                    continue
                self.metrics.failures[reason] += 1
                self.metrics.retries += 1
                self.log.warning("rid=%s sent to prefill rank %d instead: %s", rid, other.dp_rank, message)
                await self._send_task(Pending(p.req, p.msg, other.dp_rank, other.instance_id, p.skip, 0, p.nbytes,
                                              Peer(other.bootstrap_addr, ""), p.started, retried=True))
        return outputs

    def _failure(self, p: Pending, now: float) -> tuple[str, str] | None:
        """(reason, message) when the rows will not come, else None."""
        if p.rx is not None and p.rx.poll() == KVPoll.FAILED:
            return "transfer", p.rx.error
        if broken := self.transfer.broken(p.peer):
            return "transfer", f"the pair with prefill rank {p.prefill_dp_rank} broke: {broken}"
        if p.done is not None and not p.done.ok:
            return "refused", f"prefill rank {p.prefill_dp_rank}: {p.done.message}"
        if now - p.started >= self.timeout_s:
            return "timeout", f"no KV from prefill rank {p.prefill_dp_rank} after {self.timeout_s:.0f}s"
        if p.rx is None and self._lost(p.prefill_instance):
            return "prefill_rank_lost", f"prefill rank {p.prefill_dp_rank} stopped reporting"
        return None

    def _count_failure(self, reason: str, req: Req, message: str) -> None:
        self.metrics.failures[reason] += 1
        self.metrics.prefills["local"] += 1
        self.log.warning("rid=%s prefilled locally: %s", req.rid, message)

    @property
    def waiting_s(self) -> float | None:
        """How long an idle leader may wait before it must poll again (None: no transfer pending)."""
        return 0.05 if self.pending else None
