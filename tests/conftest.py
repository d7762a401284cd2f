"""Fixtures shared by the unit and integration tests: the tiny checkpoint, nats-server, servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher.supervisor import free_port, health_ok, nats_server_binary, wait_port
from services.launcher.tiny_model import create_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(create_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0))


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)])
    wait_port("127.0.0.1", port, timeout=10)
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


class Server:
    """`dpserve serve` as a real subprocess tree; its log lands in `log_path`."""

    def __init__(self, model: Path, log_path: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model)]
        argv += ["--port", str(self.port), "--torch-threads", "1", *flags]
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **env} if env else None,  # `env`: added to this process's environment
        )
        deadline = time.monotonic() + 240
        while not health_ok(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server_factory(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[type]:
    started: list[Server] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> Server:
        server = Server(tiny_model, tmp_path_factory.mktemp("server") / "serve.log", *flags, env=env)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        server.stop()
