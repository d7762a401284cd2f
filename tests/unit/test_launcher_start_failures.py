"""The supervisor while a deployment starts: a child that dies is restarted; one that keeps dying
at its start (--max-start-failures in a row) is given up on, named with its last log lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from services.launcher.supervisor import START_WINDOW_S, WORLD_BROKEN_EXIT, Child, Supervisor


def poll_until(sup: Supervisor, done, timeout: float = 30) -> Child | None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gave_up = sup.poll()
        if gave_up is not None or done():
            return gave_up
        time.sleep(0.05)
    raise TimeoutError


def test_a_child_that_keeps_dying_at_start_is_given_up_with_its_last_lines() -> None:
    sup = Supervisor(max_start_failures=2)
    code = "import sys; print('loading weights', file=sys.stderr); print('boom: bad shard 3', file=sys.stderr); sys.exit(5)"
    child = sup.add("scheduler1", [sys.executable, "-c", code])
    try:
        gave_up = poll_until(sup, lambda: False)
        assert gave_up is child
        assert child.restarts == 1  # died, restarted once, died again
        message = child.give_up_message()
        assert message.startswith("scheduler1 keeps dying at its start: 2 deaths in a row")
        assert "last exit code 5" in message
        assert message.endswith("    loading weights\n    boom: bad shard 3")
    finally:
        sup.stop(timeout=5)


def test_a_child_that_dies_once_at_start_is_restarted(tmp_path: Path) -> None:
    marker = tmp_path / "died-once"
    code = (
        f"import pathlib, sys, time; m = pathlib.Path({str(marker)!r})\n"
        "if not m.exists():\n    m.touch(); sys.exit(9)\n"
        "time.sleep(60)"
    )
    sup = Supervisor(max_start_failures=2)
    child = sup.add("scheduler0", [sys.executable, "-c", code])
    try:
        assert poll_until(sup, lambda: child.restarts == 1 and child.exited is None) is None
        time.sleep(0.5)
        assert sup.poll() is None and child.exited is None and child.start_failures == 1
    finally:
        sup.stop(timeout=5)


def test_a_death_after_a_long_life_starts_the_count_again() -> None:
    child = Child("scheduler0", ["x"], start_failures=2)
    child.started_at = time.monotonic() - START_WINDOW_S - 1
    child.record_exit()
    assert child.start_failures == 0
    child.started_at = time.monotonic()
    child.record_exit()
    assert child.start_failures == 1


def test_a_rank_whose_world_broke_is_not_counted(tmp_path: Path) -> None:
    """Exit status 3 (its world broke or never formed: a peer's fault) restarts it without counting."""
    from services.scheduler.service import EXIT_WORLD_BROKEN

    assert EXIT_WORLD_BROKEN == WORLD_BROKEN_EXIT
    sup = Supervisor(max_start_failures=1)
    child = sup.add("scheduler0-tp1", [sys.executable, "-c", "import sys; sys.exit(3)"])
    try:
        assert poll_until(sup, lambda: child.restarts >= 2) is None
        assert child.start_failures == 0
    finally:
        sup.stop(timeout=5)
