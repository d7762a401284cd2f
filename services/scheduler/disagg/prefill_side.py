"""A prefill rank's part: PrefillTasks in, each prompt prefilled like any request but ended at its
first token, its KV rows shipped to the decode rank, then a PrefillDone with that token.

Every task that was taken ships exactly the bytes its decode rank expects, zeros when there are no
rows (the request was refused, aborted or its step failed): the decode rank's receive completes
either way, and the PrefillDone says whether to use them. The prompt stays in this rank's radix
cache, so a later prompt with the same prefix is prefilled from there.
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
    rng_state: bytes = b""
    cached_tokens: int = 0
    handed: float = 0.0  # time.monotonic() the rows went to the sender


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

    def take_task(self, msg: PrefillTask) -> TokenizedRequest | None:
        """The request to prefill, or None when this rank refuses the task (it answers at once)."""
        rid = msg.req.rid
        refusal = None
        if msg.prefill_instance != self.instance_id:
            refusal = f"the task was for instance {msg.prefill_instance} of this rank, which restarted"
        elif rid in self.tasks:
            refusal = f"a prefill task for rid {rid!r} is already in progress here"
        if refusal is not None:
            self.log.warning("refused prefill task rid=%s: %s", rid, refusal)
            self.spawn(self._answer(msg, ok=False, message=refusal))
            return None
        self.tasks[rid] = Task(msg, self.transfer.sender(Peer("", msg.pair_key), msg.tag))
        self.accepted.append(msg.req.dispatch_id)
        return msg.req

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
        """Ships the rows the engine exported; the tasks' outputs become their PrefillDones.
        Returns the outputs that are not tasks'."""
        for req in shipped:
            task = self.tasks.get(req.rid)
            if task is None or req.kv_rows is None:
                continue
            rows, req.kv_rows = req.kv_rows, None
            task.cached_tokens = req.cached_tokens
            if req.generator is not None:
                task.rng_state = req.generator.get_state().numpy().tobytes()
            nbytes = rows.numel() * rows.element_size()
            if nbytes == task.msg.nbytes:
                task.handed = time.monotonic()
                task.sender.send(rows)
            else:  # the two sides disagree on the model or its dtype: nothing here is usable
                self.log.error("rid=%s: the decode rank expects %d KV bytes, this rank has %d (model or --dtype differ)",
                               req.rid, task.msg.nbytes, nbytes)
        rest = []
        for out in outputs:
            task = self.tasks.get(out.rid)
            if task is None:
                rest.append(out)
            elif out.finish is not None:
                self.spawn(self._ship(task, out))
        return rest

    async def _ship(self, task: Task, out: TokenOutput) -> None:
        """Waits for the rows to go (zeros when there are none) and answers the decode rank."""
        failure = out.finish.message if out.finish is not None and out.finish.type == "abort" else None
        if task.handed == 0.0:
            failure = failure or "the prefill rank had no rows to ship"
            task.sender.send(torch.zeros(task.msg.nbytes, dtype=torch.uint8))
        state = await asyncio.wrap_future(task.sender.result)
        self.tasks.pop(out.rid, None)
        if state == KVPoll.FAILED:
            self.metrics.failures["send"] += 1
            self.log.warning("rid=%s: sending its KV failed: %s", out.rid, task.sender.error)
            return  # the decode rank's receive failed too (the pair broke)
        if failure is None:
            self.metrics.bytes += task.msg.nbytes
            self.metrics.tokens += len(task.msg.req.input_ids) - task.msg.skip
            self.metrics.seconds.observe(time.monotonic() - task.handed)
        await self._answer(task.msg, ok=failure is None, message=failure or "", output=out,
                           rng_state=task.rng_state, cached_tokens=task.cached_tokens)

    async def _answer(self, msg: PrefillTask, ok: bool, message: str = "", output: TokenOutput | None = None,
                      rng_state: bytes = b"", cached_tokens: int = 0) -> None:
        done = PrefillDone(rid=msg.req.rid, tag=msg.tag, ok=ok, message=message, output=output if ok else None,
                           rng_state=rng_state, cached_tokens=cached_tokens)
        await self.bus.publish(self.subjects.sched_kv(msg.decode_dp_rank), done)
