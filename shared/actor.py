"""The service base: one asyncio loop (uvloop) owns the service's state.

SIGINT / SIGTERM set an event; `run` then drains the bus and returns. Resources opened in `start`
go on the exit stack and close in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from typing import Any

import uvloop

from shared.bus import Bus, connect_options
from shared.config import ServerArgs
from shared.log import setup_logging
from shared.messages import RequestError, TextBatch
from shared.subjects import Subjects


class Service:
    name = "service"
    needs_model = False  # True: `main` resolves --model-path (default model, *.gguf) before start

    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.subjects = Subjects(args.subject_prefix)
        self.log = logging.getLogger(self.name)
        self.stopping = asyncio.Event()
        self.stack = contextlib.AsyncExitStack()
        self.bus: Bus
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        """Subscribe and start background tasks. Called once the bus is connected."""

    async def stop(self) -> None:
        """Release what `start` took that the exit stack does not hold."""

    async def reply_error(self, gateway_id: str, rid: str, message: str, status: int) -> None:
        """Ends request `rid` at its gateway with an error (HTTP `status` there)."""
        error = RequestError(rid=rid, message=message, status=status)
        await self.bus.publish(self.subjects.out(gateway_id), TextBatch(outputs=[error]))

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.log.error("background task failed: %r", task.exception())
            self.stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        async with self.stack:
            connecting = loop.create_task(Bus.connect(self.args.nats_url, name=self.name, **connect_options(self.args)))
            stop = loop.create_task(self.stopping.wait())
            await asyncio.wait({connecting, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not connecting.done():  # a signal came before the bus answered
                connecting.cancel()
                self.log.info("stopped before connecting to nats=%s", self.args.nats_url)
                return
            self.bus = connecting.result()
            self.stack.push_async_callback(self.bus.close)
            await self.start()
            self.log.info("started nats=%s subject_prefix=%s", self.args.nats_url, self.args.subject_prefix)
            await self.stopping.wait()
            self.log.info("stopping")
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.stop()
        self.log.info("stopped")


def main(service_cls: type[Service], argv: list[str] | None = None) -> None:
    args = ServerArgs.parse(argv, prog=f"python -m services.{service_cls.name}")
    setup_logging(service_cls.name, args.log_level)
    if not args.nats_url:
        args = _with_default_nats(args)
    if service_cls.needs_model:
        args = _with_resolved_model(args)
    # What is imported by now lives as long as the process: out of the collector's passes it costs
    # no GC pauses, and the exit skips walking it (torch's object graph: 1-2 s of every exit).
    gc.freeze()
    uvloop.run(service_cls(args).run())


def _with_resolved_model(args: ServerArgs) -> ServerArgs:
    import dataclasses

    from shared.checkpoint import resolve_model_path

    try:
        return dataclasses.replace(args, model_path=resolve_model_path(args.model_path))
    except (OSError, ValueError) as e:
        logging.getLogger("checkpoint").error("cannot load the model: %s", e)
        raise SystemExit(2) from e


def _with_default_nats(args: ServerArgs) -> ServerArgs:
    import dataclasses

    return dataclasses.replace(args, nats_url="nats://127.0.0.1:4222")
