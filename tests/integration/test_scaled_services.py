"""Each service started alone (`python -m services.<name>`), with several tokenizers and detokenizers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from services.launcher.supervisor import free_port, health_ok
from tests.integration.client import generate, stream

COUNTS = {"tokenizer": 2, "detokenizer": 3, "dispatcher": 1, "gateway": 1}


@pytest.fixture(scope="module")
def scaled(tiny_model: Path, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    common = ["--model-path", str(tiny_model), "--nats-url", nats_url, "--dp-size", "2", "--torch-threads", "1"]
    log = open(tmp_path_factory.mktemp("scaled") / "log", "wb")
    procs = []
    for name, count in COUNTS.items():
        for _ in range(count):
            extra = ["--port", str(port)] if name == "gateway" else []
            procs.append(subprocess.Popen([sys.executable, "-m", f"services.{name}", *common, *extra], stderr=log))
    for rank in range(2):
        procs.append(subprocess.Popen([sys.executable, "-m", "services.scheduler", *common, "--dp-rank", str(rank)],
                                      stderr=log))
    url = f"http://127.0.0.1:{port}"
    import time

    deadline = time.monotonic() + 120
    while not health_ok(url):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.2)
    yield url
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(30) == 0  # SIGTERM drains and exits cleanly
    log.close()


def test_streams_stay_in_order_across_detokenizers(scaled: str, tiny_model: Path) -> None:
    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    prompts = [f"request {i}: ünïcödé 中文 🙂 " * (1 + i % 3) for i in range(16)]
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}

    def run(prompt: str) -> tuple[list[dict], dict]:
        return stream(scaled, text=prompt, sampling_params=params), generate(scaled, text=prompt, sampling_params=params)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, prompts))
    for events, whole in results:
        ids = [e["output_ids"] for e in events]
        assert all(a == b[: len(a)] for a, b in zip(ids, ids[1:], strict=False))  # in order, nothing lost
        assert events[-1]["output_ids"] == whole["output_ids"]
        assert events[-1]["text"] == whole["text"] == tok.decode(whole["output_ids"], skip_special_tokens=True)
