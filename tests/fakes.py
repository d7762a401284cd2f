"""Test doubles for unit tests (integration tests run the real bus)."""

from __future__ import annotations

from typing import Any

import msgspec


class FakeBus:
    """Records what a service publishes; subscriptions are accepted and never deliver. Tests call
    the service's handlers directly."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, msgspec.Struct]] = []

    async def publish(self, subject: str, msg: msgspec.Struct) -> None:
        self.sent.append((subject, msg))

    async def subscribe(self, *args: Any, **kw: Any) -> None:
        return None

    async def serve(self, *args: Any, **kw: Any) -> None:
        return None

    def of(self, kind: type) -> list[Any]:
        """The published messages of type `kind`, in order."""
        return [m for _, m in self.sent if isinstance(m, kind)]

    def take(self) -> list[tuple[str, msgspec.Struct]]:
        """What was published since the last take."""
        out, self.sent = self.sent, []
        return out


class FakeClock:
    """A monotonic clock the test moves by hand: `clock.now += 2.0`."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
