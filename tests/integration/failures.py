"""Helpers of the failure tests: find a service's process inside a `dpserve serve` tree."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.integration.client import get
from tests.integration.test_launcher import alive, descendants


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def service_pids(root: int, module: str, **flags: str) -> list[int]:
    """Live pids under `root` running `python -m <module>` with every `--flag value` given."""
    out = []
    for pid in sorted(descendants(root)):
        argv = cmdline(pid)
        if module not in argv or not alive(pid):
            continue
        if all(f"--{k.replace('_', '-')}" in argv and argv[argv.index(f"--{k.replace('_', '-')}") + 1] == v
               for k, v in flags.items()):
            out.append(pid)
    return out


def loads(url: str) -> dict[int, dict[str, Any]]:
    status, body = get(url + "/get_loads")
    assert status == 200, body
    return {r["dp_rank"]: r for r in body["ranks"]}


def wait_loads(url: str, what: str, check: Any, timeout: float = 60) -> dict[int, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            now = loads(url)
        except (AssertionError, OSError):
            now = {}
        if now and check(now):
            return now
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {now}"
        time.sleep(0.05)
