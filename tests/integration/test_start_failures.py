"""`dpserve serve` while it starts: a rank killed before it loaded is restarted and the deployment
comes up whole; a rank that can never load (truncated weights) ends the deployment after
--max-start-failures deaths in a row, with an error naming it and its last log lines."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.launcher.supervisor import free_port, health_ok
from tests.integration.client import generate
from tests.integration.failures import service_pids
from tests.integration.tp_reference import wait_ranks


def serve(model: Path, port: int, log: Path, *flags: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model), "--port", str(port)]
    with open(log, "wb") as out:
        return subprocess.Popen([*argv, "--torch-threads", "1", *flags], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_rank_killed_during_startup_is_restarted(tiny_model: Path, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(tiny_model, port, log, "--dp-size", "2")
    try:
        deadline = time.monotonic() + 30
        while not (victims := service_pids(proc.pid, "services.scheduler", dp_rank="1")):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.02)
        os.kill(victims[0], signal.SIGKILL)  # still importing torch: long before it could report
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not health_ok(url):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        wait_ranks(url, 2)
        text = log.read_text()
        assert "scheduler1 exited code=-9; restarting" in text
        out = generate(url, text="hi", sampling_params={"max_new_tokens": 3, "temperature": 0}, routed_dp_rank=1)
        assert len(out["output_ids"]) == 3
    finally:
        stop(proc)


def test_a_rank_that_keeps_dying_at_start_ends_the_deployment(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (shard,) = broken.glob("*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])  # the tokenizer still loads; the weights never do
    log = tmp_path / "serve.log"
    proc = serve(broken, free_port(), log, "--max-start-failures", "2")
    try:
        assert proc.wait(120) == 1
    finally:
        stop(proc)
    text = log.read_text()
    assert "scheduler0 exited code=1; restarting" in text  # the first death was restarted
    error = text[text.index("scheduler0 keeps dying at its start: 2 deaths in a row"):]
    assert "last exit code 1" in error
    # its last log lines ride along in the error: the scheduler's own complaint about the shard
    tail = error.split("Its last log lines:\n", 1)[1]
    assert tail.splitlines()[0].startswith("    ")
    assert "    safetensors._safetensors_rust.SafetensorError: Error while deserializing header" in tail, error[:3000]
