"""What the gateway needs of the bus: it publishes, and it asks the dispatcher (request/reply).

`shared.bus.Bus` is both. Unit tests give the gateway a publisher only (tests/fakes.py `FakeBus`)
and no requester: then `GET /get_loads` answers 503 and a resume gets no answer.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import msgspec

T = TypeVar("T")


class Publisher(Protocol):
    async def publish(self, subject: str, msg: msgspec.Struct) -> None: ...


class Requester(Protocol):
    async def request(self, subject: str, msg: msgspec.Struct, kind: type[T], timeout: float = ...) -> T: ...
