"""`--attention-backend` on a real `dpserve serve`: the Triton kernels (under the interpreter on
the CPU) give the torch backend's greedy outputs, and a backend that cannot run stops startup."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.launcher.supervisor import free_port
from tests.integration.client import generate

PROMPTS = ["Hello", "The cat sat", "1 2 3", "Hello"]  # the repeat extends a cached prefix


def greedy_outputs(url: str) -> list[list[int]]:
    def one(text: str) -> list[int]:
        params = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
        return generate(url, text=text, sampling_params=params)["output_ids"]

    first = [one(PROMPTS[0])]  # alone: a prefill, then pure decode steps
    with ThreadPoolExecutor(len(PROMPTS) - 1) as pool:  # together: mixed and batched steps
        return first + list(pool.map(one, PROMPTS[1:]))


@pytest.mark.slow
def test_triton_backend_matches_torch(server_factory: Callable[..., Any]) -> None:
    triton = server_factory("--attention-backend", "triton", env={"TRITON_INTERPRET": "1"})
    assert "attention backend: triton" in triton.log()
    got = greedy_outputs(triton.url)
    torch_server = server_factory("--attention-backend", "torch")
    assert "attention backend: torch" in torch_server.log()
    want = greedy_outputs(torch_server.url)
    assert got == want
    assert all(len(ids) == 4 for ids in got)


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_fails_at_startup(tiny_model: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(tiny_model)]
    argv += ["--port", str(free_port()), "--torch-threads", "1", "--attention-backend", "triton", "--max-start-failures", "1"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "--attention-backend triton needs a CUDA device" in log
    assert "scheduler0 keeps dying at its start: 1 death in a row" in log
