"""`dpserve serve`: one command, one machine. `dpserve create-tiny-model DIR`: a test checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from services.bench import main as bench_main
from services.launcher.config_file import load_config_file
from services.launcher.startup import Progress, server_info, summary
from services.launcher.supervisor import Supervisor, free_port, health_ok, nats_server_argv, wait_port
from services.launcher.tiny_model import ARCHITECTURES, create_tiny_model
from shared.checkpoint import resolve_model_path
from shared.config import ServerArgs
from shared.log import setup_logging

log = logging.getLogger("launcher")

STARTUP_TIMEOUT = 600.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dpserve",
        description="Data-parallel LLM serving: asyncio services on a NATS bus, SGLang's flags and APIs.",
        epilog="Every serve flag is also the env var DPSERVE_<FLAG> (e.g. DPSERVE_DP_SIZE=2) or a key of --config FILE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve a model over HTTP on this machine (embedded nats-server + one process per service)",
        usage="%(prog)s [-h] [--config FILE] [FLAG VALUE ...]",
        description="Serve a model: SGLang's /generate, OpenAI's /v1/*, /metrics. Precedence: flags > "
        "--config file > DPSERVE_* env vars > defaults.",
    )
    serve.add_argument("--config", default="", metavar="FILE",
                       help="YAML or JSON file of serve flags (`dp-size: 2`)")
    ServerArgs.add_cli_args(serve)
    tiny = sub.add_parser("create-tiny-model", help="write a tiny random-weight checkpoint",
                          description="Write a tiny random-weight Hugging Face checkpoint (tests, demos).")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--arch", default="llama", choices=sorted(ARCHITECTURES), help="model architecture")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    bench = sub.add_parser("bench", help="benchmark a server that speaks SGLang's /generate",
                           description="A serving benchmark after SGLang's bench_serving: prints the "
                           "'Serving Benchmark Result' block and can append a JSONL record.")
    bench_main.add_args(bench)
    ns = parser.parse_args(argv)
    if ns.command == "create-tiny-model":
        print(create_tiny_model(ns.dir, arch=ns.arch, seed=ns.seed))
        return
    if ns.command == "bench":
        sys.exit(bench_main.main(ns))
    if ns.config:
        try:
            serve.set_defaults(**load_config_file(ns.config))
        except (OSError, ValueError) as e:
            parser.error(f"--config: {e}")
        ns = parser.parse_args(argv)
    args = ServerArgs.from_namespace(ns)
    setup_logging("launcher", args.log_level)
    sys.exit(serve_forever(args))


def scheduler_ranks(args: ServerArgs) -> list[dict[str, object]]:
    """The scheduler processes, as flag overrides (SGLang's layout). Without DP attention:
    dp_size independent replicas of tp_size ranks, each replica its own torch.distributed world
    (its own TCP store port). With --enable-dp-attention: tp_size ranks in one world, rank r
    serving DP group r // (tp_size // dp_size)."""
    if args.tp_size == 1 and not args.enable_dp_attention:
        return [{"dp_rank": d} for d in range(args.dp_size)]
    if args.enable_dp_attention:
        addr = f"127.0.0.1:{free_port()}"
        attn_tp = args.tp_size // args.dp_size
        return [
            {"dp_rank": r // attn_tp, "tp_rank": r, "dist_init_addr": addr} for r in range(args.tp_size)
        ]
    out: list[dict[str, object]] = []
    for d in range(args.dp_size):
        addr = f"127.0.0.1:{free_port()}"
        out += [{"dp_rank": d, "tp_rank": r, "dist_init_addr": addr} for r in range(args.tp_size)]
    return out


def serve_forever(args: ServerArgs) -> int:
    # once, here: the children get the checkpoint dir (the default model / a GGUF converted)
    try:
        args = dataclasses.replace(args, model_path=resolve_model_path(args.model_path))
    except (OSError, ValueError) as e:
        log.error("cannot load the model: %s", e)
        return 2
    if args.torch_threads == 0:
        procs = len(scheduler_ranks(args))
        args = dataclasses.replace(args, torch_threads=max(1, (os.cpu_count() or 1) // procs))
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.api_key:  # the launcher's own probes (/get_server_info) authenticate
        opener = urllib.request.build_opener()
        opener.addheaders = [("Authorization", f"Bearer {args.api_key}")]
        urllib.request.install_opener(opener)
    sup = Supervisor()
    conf_dir = tempfile.TemporaryDirectory(prefix="dpserve-nats-")
    secrets = args.secret_env()  # children read these from the environment, not from argv
    try:
        if not args.nats_url:
            port = free_port()
            sup.add("nats-server", nats_server_argv(port, args, Path(conf_dir.name)))
            wait_port("127.0.0.1", port, timeout=10)
            args = dataclasses.replace(args, nats_url=f"nats://127.0.0.1:{port}")
        py = [sys.executable, "-m"]
        for name in ("tokenizer", "detokenizer", "dispatcher"):
            sup.add(name, py + [f"services.{name}"] + args.to_cli(), secrets)
        for rank in scheduler_ranks(args):
            name = f"scheduler{rank['dp_rank']}" + (f"-tp{rank['tp_rank']}" if args.tp_size > 1 else "")
            # a torch.distributed world restarts as a whole: all ranks with DP attention, else each replica
            world = "" if args.tp_size == 1 else "schedulers" if args.enable_dp_attention else f"scheduler{rank['dp_rank']}"
            sup.add(name, py + ["services.scheduler"] + args.to_cli(**rank), secrets, group=world)
        sup.add("gateway", py + ["services.gateway"] + args.to_cli(), secrets)
        url = f"http://{args.host}:{args.port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        progress = Progress(args.dp_size, "loading model on DP ranks")
        while True:
            info = server_info(url)
            ranks = len(info["internal_states"]) if info else 0
            progress.update(ranks)
            if ranks >= args.dp_size and health_ok(url):
                break
            if stopping:
                return 0
            failed = sup.poll(restart=False)
            if failed is not None:
                log.error("%s exited during startup (code %s)", failed.name, failed.exited)
                return 1
            if time.monotonic() > deadline:
                log.error("/health did not answer within %.0fs", STARTUP_TIMEOUT)
                return 1
            time.sleep(0.2)
        progress.close()
        print(summary(args, url, server_info(url)), flush=True)
        while not stopping:
            sup.poll(restart=True)
            time.sleep(0.2)
        return 0
    finally:
        log.info("stopping all services")
        sup.stop(grace=args.shutdown_grace_period)
        conf_dir.cleanup()
