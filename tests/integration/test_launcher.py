"""`dpserve serve`: URL printed once healthy, every child gone after a signal. (The default model:
tests/integration/test_real_model.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.launcher.supervisor import free_port
from tests.integration.client import generate


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_then_stop_leaves_no_process(tiny_model: Path, tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    env = os.environ | {"DPSERVE_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(tiny_model)]
    argv += ["--port", str(port), "--torch-threads", "1"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = f"http://127.0.0.1:{port}"
        assert url in line, line  # printed only once /health answers
        out = generate(url, text="hello", sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert len(out["output_ids"]) == 4
        tree = descendants(proc.pid)
        assert len(tree) >= 6  # nats-server + five services
        proc.send_signal(sig)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in tree if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
