"""`dpserve bench` against a local `dpserve serve` (tiny model): the Serving Benchmark Result block.

Usage: .venv/bin/python benchmarks/bench_serving_api.py [--dp-size 2] [--num-prompts 32]
Starts the server (tiny model in a temp dir), runs the random and generated-shared-prefix datasets,
prints each block, and stops the server.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.launcher.supervisor import free_port, health_ok
from services.launcher.tiny_model import create_tiny_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dp-size", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=32)
    ns = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = create_tiny_model(Path(tmp) / "tiny", arch="llama", seed=0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "services.launcher", "serve", "--model-path", str(model), "--port", str(port),
             "--dp-size", str(ns.dp_size), "--torch-threads", "1", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            while not health_ok(url):
                time.sleep(0.3)
            time.sleep(2)  # every rank reported
            common = ["--base-url", url, "--num-prompts", str(ns.num_prompts), "--backend", "dpserve"]
            runs = {
                "random 64 in / 16 out": ["--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "16"],
                "generated-shared-prefix 4x8, 64+16 in / 16 out": [
                    "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "4", "--gsp-prompts-per-group", "8",
                    "--gsp-system-prompt-len", "64", "--gsp-question-len", "16", "--gsp-output-len", "16"],
            }
            for title, flags in runs.items():
                print(f"\n## {title} (dp_size={ns.dp_size}, {ns.num_prompts} prompts, request rate inf)\n", flush=True)
                subprocess.run([sys.executable, "-m", "services.launcher", "bench", *common, *flags], check=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


if __name__ == "__main__":
    main()
