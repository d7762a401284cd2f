"""`dpserve serve`: one command, one machine. `dpserve create-tiny-model DIR`: a test checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time

from services.launcher.supervisor import Supervisor, free_port, health_ok, nats_server_binary, wait_port
from services.launcher.tiny_model import create_tiny_model, ensure_tiny_model
from shared.config import ServerArgs
from shared.log import setup_logging

log = logging.getLogger("launcher")

STARTUP_TIMEOUT = 600.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpserve")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over HTTP on this machine")
    ServerArgs.add_cli_args(serve)
    tiny = sub.add_parser("create-tiny-model", help="write a tiny random-weight checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    tiny.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    if ns.command == "create-tiny-model":
        print(create_tiny_model(ns.dir, arch=ns.arch, seed=ns.seed))
        return
    args = ServerArgs.from_namespace(ns)
    setup_logging("launcher", args.log_level)
    sys.exit(serve_forever(args))


def serve_forever(args: ServerArgs) -> int:
    if not args.model_path:
        args = dataclasses.replace(args, model_path=str(ensure_tiny_model()))
    if args.torch_threads == 0:
        args = dataclasses.replace(args, torch_threads=max(1, (os.cpu_count() or 1) // args.dp_size))
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sup = Supervisor()
    try:
        if not args.nats_url:
            port = free_port()
            sup.add("nats-server", [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)])
            wait_port("127.0.0.1", port, timeout=10)
            args = dataclasses.replace(args, nats_url=f"nats://127.0.0.1:{port}")
        py = [sys.executable, "-m"]
        for name in ("tokenizer", "detokenizer", "dispatcher"):
            sup.add(name, py + [f"services.{name}"] + args.to_cli())
        for dp_rank in range(args.dp_size):
            sup.add(f"scheduler{dp_rank}", py + ["services.scheduler"] + args.to_cli(dp_rank=dp_rank))
        sup.add("gateway", py + ["services.gateway"] + args.to_cli())
        url = f"http://{args.host}:{args.port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not health_ok(url):
            if stopping:
                return 0
            failed = sup.check(restart=False)
            if failed is not None:
                log.error("%s exited during startup (code %s)", failed.name, failed.exited)
                return 1
            if time.monotonic() > deadline:
                log.error("/health did not answer within %.0fs", STARTUP_TIMEOUT)
                return 1
            time.sleep(0.2)
        print(f"dpserve is serving {args.model_name} at {url} (dp_size={args.dp_size})", flush=True)
        while not stopping:
            sup.check(restart=True)
            time.sleep(0.2)
        return 0
    finally:
        log.info("stopping all services")
        sup.stop()
