"""A prefill rank's part: PrefillTasks in, each prompt prefilled like any request but ended at its
first token; then a PrefillDone tells the decode rank the rows are coming (with that token), and
they are sent.

A task that ends without rows (refused, aborted, its step failed, the two sides' models differ)
gets a PrefillDone that says so, and its sender is cancelled: the decode rank posts no receive for
it and prefills the request itself. The prompt stays in this rank's radix cache, so a later prompt
with the same prefix is prefilled from there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import torch

from services.scheduler.disagg.metrics import DisaggMetrics
from services.scheduler.disagg.transfer import KVPoll, KVSender, Peer, TransferEngine
from services.scheduler.request import Req
from shared.bus import Bus
from shared.messages import PrefillDone, PrefillTask, TokenizedRequest, TokenOutput
from shared.subjects import Subjects


@dataclass
class Task:
    msg: PrefillTask
    sender: KVSender
    rows: torch.Tensor | None = None  # exported by the engine, until sent
    rng_state: bytes = b""
    cached_tokens: int = 0


class PrefillSide:
    def __init__(self, bus: Bus, subjects: Subjects, transfer: TransferEngine, instance_id: str,
                 metrics: DisaggMetrics, spawn: Callable[[Coroutine[Any, Any, None]], object], log: logging.Logger) -> None:
        self.bus = bus
        self.subjects = subjects
        self.transfer = transfer
        self.instance_id = instance_id
        self.metrics = metrics
        self.spawn = spawn  # the service's background tasks
        self.log = log
        self.tasks: dict[str, Task] = {}  # rid -> task, until its PrefillDone is sent
        self.accepted: list[int] = []  # dispatch ids of tasks taken since the last load report

    def take_task(self, msg: PrefillTask, refusal: str | None = None) -> TokenizedRequest | None:
        """The request to prefill, or None when this rank refuses the task (it answers at once);
        `refusal`: the rank's own reason to refuse its request (bad sampling values, a full queue)."""
        rid = msg.req.rid
        refusal = refusal or self._refusal(msg)
        if refusal is not None:
            self.log.warning("refused prefill task rid=%s: %s", rid, refusal)
            self.spawn(self._answer(msg, ok=False, message=refusal))
            return None
        self.tasks[rid] = Task(msg, self.transfer.sender(Peer("", msg.pair_key), msg.tag))
        self.accepted.append(msg.req.dispatch_id)
        return msg.req

    def _refusal(self, msg: PrefillTask) -> str | None:
        rid = msg.req.rid
        if msg.prefill_instance != self.instance_id:
            return f"the task was for instance {msg.prefill_instance} of this rank, which restarted"
        if rid in self.tasks:
            return f"a prefill task for rid {rid!r} is already in progress here"
        if not (0 < msg.tag < 1 << 31 and 0 <= msg.skip < len(msg.req.input_ids) and msg.nbytes >= 0):
            return f"bad task: tag {msg.tag}, skip {msg.skip} of {len(msg.req.input_ids)}, nbytes {msg.nbytes}"
        return None

    def mark(self, reqs: list[Req]) -> None:
        """The requests entering the engine that are tasks end at their first token and ship their rows."""
        for req in reqs:
            task = self.tasks.get(req.rid)
            if task is not None:
                req.ships_kv_from = task.msg.skip

    def take_report(self) -> list[int]:
        out, self.accepted = self.accepted, []
        return out

    def intercept(self, outputs: list[TokenOutput], shipped: list[Req]) -> list[TokenOutput]:
        """Takes the rows the engine exported; the tasks' outputs become their PrefillDones, each
        followed by its rows. Returns the outputs that are not tasks'."""
        for req in shipped:
            task = self.tasks.get(req.rid)
            if task is None or req.kv_rows is None:
                continue
            task.rows, req.kv_rows = req.kv_rows, None
            task.cached_tokens = req.cached_tokens
            if req.generator is not None:
                task.rng_state = req.generator.get_state().numpy().tobytes()
        rest = []
        for out in outputs:
            task = self.tasks.get(out.rid)
            if task is None:
                rest.append(out)
            elif out.finish is not None:
                self.spawn(self._ship(task, out))
        return rest

    async def _ship(self, task: Task, out: TokenOutput) -> None:
        """Answers the decode rank, then sends the rows and waits for them to go."""
        rid, rows = out.rid, task.rows
        task.rows = None
        failure = out.finish.message if out.finish is not None and out.finish.type == "abort" else None
        if failure is None and rows is None:
            failure = "the prefill rank had no rows to ship"
        if failure is None and rows is not None and rows.numel() * rows.element_size() != task.msg.nbytes:
            failure = (f"the decode rank expects {task.msg.nbytes} KV bytes, the prefill rank has "
                       f"{rows.numel() * rows.element_size()} (their models or --dtype differ)")
            self.log.error("rid=%s: %s", rid, failure)
        try:
            if failure is not None or rows is None:
                task.sender.cancel(failure or "")
                await self._answer(task.msg, ok=False, message=failure or "")
                return
            await self._answer(task.msg, ok=True, output=out, rng_state=task.rng_state,
                               cached_tokens=task.cached_tokens)
            started = time.monotonic()
            task.sender.send(rows)
            state = await asyncio.wrap_future(task.sender.result)
        finally:
            self.tasks.pop(rid, None)
        if state == KVPoll.FAILED:
            self.metrics.failures["send"] += 1
            self.log.warning("rid=%s: sending its KV failed: %s", rid, task.sender.error)
            return  # the decode rank's receive failed too (the pair broke)
        self.metrics.bytes += task.msg.nbytes
        self.metrics.tokens += len(task.msg.req.input_ids) - task.msg.skip
        self.metrics.seconds.observe(time.monotonic() - started)

    async def _answer(self, msg: PrefillTask, ok: bool, message: str = "", output: TokenOutput | None = None,
                      rng_state: bytes = b"", cached_tokens: int = 0) -> None:
        done = PrefillDone(rid=msg.req.rid, tag=msg.tag, ok=ok, message=message, pair_key=msg.pair_key,
                           nbytes=msg.nbytes, output=output if ok else None, rng_state=rng_state,
                           cached_tokens=cached_tokens)
        await self.bus.publish(self.subjects.sched_kv(msg.decode_dp_rank), done)
