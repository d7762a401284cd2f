"""`dpserve serve`: one command per machine (`--nnodes`: see nodes.py). `dpserve create-tiny-model DIR`: a test checkpoint."""

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
from collections.abc import Callable
from pathlib import Path

from services.bench import main as bench_main
from services.launcher.config_file import load_config_file
from services.launcher.layout import (
    deployment_args,
    node_ranks,
    node_worlds,
    process_name,
    scheduler_ranks,
    validate_sides,
    world_of,
)
from services.launcher.nodes import NodePlan
from services.launcher.startup import Progress, server_info, summary
from services.launcher.supervisor import Supervisor, free_port, health_ok, nats_server_argv, wait_port
from services.launcher.tiny_model import ARCHITECTURES, create_tiny_model
from services.launcher.worlds import LauncherBus, WorldCoordinator
from shared.bus import connect_options
from shared.checkpoint import resolve_model_path
from shared.config import ServerArgs
from shared.log import setup_logging
from shared.subjects import Subjects

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


def serve_forever(args: ServerArgs) -> int:
    try:
        validate_sides(args)
    except ValueError as e:
        log.error("cannot serve this layout: %s", e)
        return 2
    # the prefill and decode sides' schedulers get their own layout; the rest counts P + D ranks
    args = deployment_args(args)
    # once, here: the children get the checkpoint dir (the default model / a GGUF converted)
    try:
        args = dataclasses.replace(args, model_path=resolve_model_path(args.model_path))
    except (OSError, ValueError) as e:
        log.error("cannot load the model: %s", e)
        return 2
    try:
        plan = NodePlan.from_args(args) if args.nnodes > 1 else None
    except (OSError, ValueError) as e:
        log.error("cannot place node %d: %s", args.node_rank, e)
        return 2
    ranks = scheduler_ranks(args) if plan is None else node_ranks(args, plan)
    if args.torch_threads == 0:
        args = dataclasses.replace(args, torch_threads=max(1, (os.cpu_count() or 1) // max(1, len(ranks))))
    if plan is not None:  # nothing binds loopback across nodes (a prefill rank's KV transfer: --node-addr)
        args = dataclasses.replace(args, node_addr=plan.node_addr)
        if args.host == "127.0.0.1":
            args = dataclasses.replace(args, host=plan.node_addr)
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
    sup = Supervisor(args.max_start_failures)
    conf_dir = tempfile.TemporaryDirectory(prefix="dpserve-nats-")
    secrets = args.secret_env()  # children read these from the environment, not from argv
    launcher_bus: LauncherBus | None = None
    coordinator: WorldCoordinator | None = None
    try:
        if not args.nats_url:
            args = start_nats(sup, args, plan, Path(conf_dir.name))
        py = [sys.executable, "-m"]
        head = plan is None or plan.is_head
        if plan is not None:
            log.info("node %d of %d at %s: %d scheduler ranks, gloo on %s", plan.node_rank, plan.nnodes,
                     plan.node_addr, len(ranks), plan.gloo_ifname)
            launcher_bus = start_node(sup, args, plan)
            worlds = node_worlds(args, plan.node_rank)
            coordinator = WorldCoordinator(sup, plan, worlds, launcher_bus, Subjects(args.subject_prefix))
        if head:
            for name in ("tokenizer", "detokenizer", "dispatcher"):
                sup.add(name, py + [f"services.{name}"] + args.to_cli(), secrets)
        # gloo (and NCCL's bootstrap on CUDA) bind the node's interface, never the hostname's guess
        ifname = {"GLOO_SOCKET_IFNAME": plan.gloo_ifname, "NCCL_SOCKET_IFNAME": plan.gloo_ifname} if plan else {}
        rank_env = secrets | ifname
        for rank in ranks:
            # a torch.distributed world restarts as a whole: all ranks with DP attention, else each replica
            argv = py + ["services.scheduler"] + args.to_cli(**rank)
            sup.add(process_name(args, rank), argv, rank_env, group=world_of(args, rank))
        if not head:
            return supervise(sup, lambda: stopping, coordinator)
        sup.add("gateway", py + ["services.gateway"] + args.to_cli(), secrets)
        url = f"http://{args.host}:{args.port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        progress = Progress(args.dp_size, "loading model on DP ranks")
        while True:
            info = server_info(url)
            ranks_up = len(info["internal_states"]) if info else 0
            progress.update(ranks_up)
            if ranks_up >= args.dp_size and health_ok(url):
                break
            if stopping:
                return 0
            if not turn(sup, coordinator):  # a rank that dies while the deployment starts is restarted too
                return 1
            if time.monotonic() > deadline:
                log.error("/health did not answer within %.0fs", STARTUP_TIMEOUT)
                return 1
            time.sleep(0.2)
        progress.close()
        print(summary(args, url, server_info(url)), flush=True)
        return supervise(sup, lambda: stopping, coordinator)
    finally:
        log.info("stopping all services")
        if launcher_bus is not None:
            launcher_bus.close()
        sup.stop(grace=args.shutdown_grace_period)
        conf_dir.cleanup()


def start_nats(sup: Supervisor, args: ServerArgs, plan: NodePlan | None, conf_dir: Path) -> ServerArgs:
    """The embedded nats-server: on loopback for one node; on several, bound to the node address
    and clustered with the other nodes' servers. Returns the args with the services' --nats-url."""
    if plan is None:
        port = args.nats_port or free_port()
        sup.add("nats-server", nats_server_argv(port, args, conf_dir))
        wait_port("127.0.0.1", port, timeout=10)
        return dataclasses.replace(args, nats_url=f"nats://127.0.0.1:{port}")
    argv = nats_server_argv(plan.nats_port, args, conf_dir, host=plan.node_addr, cluster=plan)
    sup.add("nats-server", argv)
    wait_port(plan.node_addr, plan.nats_port, timeout=10)
    return dataclasses.replace(args, nats_url=plan.nats_url)


def start_node(sup: Supervisor, args: ServerArgs, plan: NodePlan) -> LauncherBus:
    """What a node of several runs beside its services: node 0 the rendezvous store (when any
    world exists); every node the launcher's own bus client (returned), for world restarts and
    for ending the deployment together."""
    if plan.is_head and any("dist_init_addr" in r for r in scheduler_ranks(args)):
        sup.add("rendezvous", [sys.executable, "-m", "services.launcher.rendezvous", plan.dist_init_addr])
    return LauncherBus(args.nats_url, connect_options(args))


def turn(sup: Supervisor, coordinator: WorldCoordinator | None) -> bool:
    """One turn of the supervisor loop: restart what exited, let the coordinator act (several
    nodes). False: the deployment ends (said in the log, and to the other nodes)."""
    gave_up = sup.poll()
    if gave_up is not None:
        message = gave_up.give_up_message()
        log.error(message)
        if coordinator is not None:
            coordinator.end(message)
        return False
    reason = coordinator.step() if coordinator is not None else None
    if reason is not None:
        log.error(reason)
        return False
    return True


def supervise(sup: Supervisor, stopping: Callable[[], bool], coordinator: WorldCoordinator | None) -> int:
    """Restarts whatever exits until a signal comes, or until the deployment ends (a process kept
    dying at its start, here or on another node)."""
    while not stopping():
        if not turn(sup, coordinator):
            return 1
        time.sleep(0.2)
    return 0
