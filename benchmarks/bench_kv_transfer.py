"""One prompt's KV rows from a prefill process to a decode process on loopback: our gloo pair
(`GlooTransferEngine`, services/scheduler/disagg/transfer.py, used as the schedulers use it)
against Mooncake's transfer engine over its TCP protocol (SGLang's default PD backend) and NIXL's
UCX backend (vLLM's), DRAM to DRAM.

Per backend, two fresh processes: a decode worker (it listens on a control socket, the stand-in for
NATS) and a prefill worker that drives. Payloads: SmolLM2-135M's float32 KV per token is 30 layers x
2 x 3 kv heads x 64 x 4 bytes = 46,080 bytes, so --tokens 256, 2048, 8192 are 11.8, 94 and 377 MB;
a 64 KiB payload first shows the fixed cost. One transfer, as the prefill worker times it:
  gloo      the decode side posts `engine.receiver(peer, tag, nbytes)` and says so; t0; the prefill
            side calls `engine.sender(peer, tag).send(rows)`; the decode side's receiver reaches
            SUCCESS and it says so; t1 when that word arrives. The decode side releases each
            receiver before posting the next, as a decode rank does once it installed the rows, so
            the engine receives into a kept buffer; "gloo, fresh buffers" never releases (a new
            buffer per receive, its pages faulted in by the receive itself).
  mooncake  both sides registered one buffer of the largest payload at start (as a KV pool would be
            registered once); the decode side sent its session id and buffer address; t0;
            `transfer_sync_write(session, src, dst, nbytes)` (P2PHANDSHAKE metadata, no etcd; since
            its TCP framing v2 the call returns once the decode side acknowledged the last byte in
            place); the prefill side tells the decode side the rows are written, it answers; t1.
            A one-sided write needs that word to reach the decode side, so the round trip counts.
  nixl      as mooncake, with agents that exchanged metadata over the control socket; per transfer
            `initialize_xfer("WRITE", ...)`, `transfer`, `check_xfer_state` until DONE, then the
            same round trip. UCX_TLS=tcp by default (--nixl-ucx-tls tcp,all adds UCX's own choice,
            shared memory on one host).
Each payload gets --warmup untimed transfers, then --repeats timed ones (median, P90); the last one's
bytes are checked by digest on both sides. Pair setup is reported apart: the engine's start in each
process and the first 64 KiB transfer on a new pair (gloo: the two-process group's rendezvous at the
prefill side's TCPStore; mooncake: the handshake with a segment not met before; nixl: adding the
remote agent and UCX's connection), one sample each.

Neither Mooncake nor NIXL is a dpserve dependency: install `mooncake-transfer-engine-non-cuda` (its
engine.so needs libibverbs.so.1: `apt-get install libibverbs1`) and `nixl-cu12 --no-deps` plus numpy
into other venvs and pass their pythons; their workers need neither torch nor this repo. A backend
that cannot be imported is skipped, saying so. The workers' stderr goes to --logs.

    .venv/bin/python benchmarks/bench_kv_transfer.py [--backends gloo,mooncake,nixl] \
        [--python-mooncake /tmp/mcvenv/bin/python] [--python-nixl /tmp/nixlvenv/bin/python] \
        [--nixl-ucx-tls tcp] [--tokens 256,2048,8192] [--repeats 10] [--warmup 2]
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M, float32
LATENCY_BYTES = 64 * 1024
WORKER_TIMEOUT_S = 900.0


# --- control channel: JSON lines over one TCP connection -------------------------------------------


class Control:
    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.file = sock.makefile("rwb")

    def send(self, **msg: Any) -> None:
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise ConnectionError("the other worker closed the control connection")
        msg: dict[str, Any] = json.loads(line)
        return msg


def listen_control() -> Control:
    """Decode side: prints the port for the driver, accepts the prefill worker."""
    server = socket.create_server(("127.0.0.1", 0))
    print(f"control {server.getsockname()[1]}", flush=True)
    conn, _ = server.accept()
    server.close()
    return Control(conn)


def connect_control(addr: str) -> Control:
    host, _, port = addr.rpartition(":")
    return Control(socket.create_connection((host, int(port)), timeout=WORKER_TIMEOUT_S))


def payload(nbytes: int) -> bytes:
    return os.urandom(nbytes)


def digest(view: memoryview | bytes) -> str:
    return hashlib.blake2b(view, digest_size=16).hexdigest()


def address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@dataclass(frozen=True)
class Plan:
    sizes: list[int]  # bytes, the latency payload first
    warmup: int
    repeats: int


def drive(plan: Plan, transfer: Any, check: Any) -> dict[str, Any]:
    """Prefill side: the first transfer on the new pair, then each payload's warm-ups and repeats."""
    setup_s = transfer(LATENCY_BYTES)
    timings: dict[str, list[float]] = {}
    for nbytes in plan.sizes:
        for _ in range(plan.warmup):
            transfer(nbytes)
        timings[str(nbytes)] = [transfer(nbytes) for _ in range(plan.repeats)]
        check(nbytes)
    return {"setup_s": setup_s, "timings": timings}


# --- gloo: GlooTransferEngine as the schedulers use it -----------------------------------------------


def gloo_decode(_: Plan) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from services.scheduler.disagg.transfer import GlooTransferEngine, KVPoll, Peer

    t = time.perf_counter()
    engine = GlooTransferEngine("decode")
    start_s = time.perf_counter() - t
    control = listen_control()
    hello = control.recv()
    peer = Peer(hello["bootstrap"], hello["key"])
    control.send(op="hello", start_s=start_s)
    last = None
    while (msg := control.recv())["op"] != "bye":
        if msg["op"] == "post":
            if last is not None and not os.environ.get("BENCH_GLOO_FRESH"):
                engine.release(last)  # as a decode rank does once it installed the rows
            last = engine.receiver(peer, msg["tag"], msg["nbytes"])
            control.send(op="ready")
            if last.result.result(timeout=WORKER_TIMEOUT_S) != KVPoll.SUCCESS:
                raise RuntimeError(last.error)
            control.send(op="done")
        elif msg["op"] == "digest":
            assert last is not None
            control.send(op="digest", digest=digest(last.buffer.numpy().data))
    engine.close()
    return {}


def gloo_prefill(plan: Plan, control_addr: str) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import torch

    from services.scheduler.disagg.transfer import GlooTransferEngine, KVPoll, Peer

    t = time.perf_counter()
    engine = GlooTransferEngine("prefill")
    start_s = time.perf_counter() - t
    peer = Peer(engine.bootstrap_addr, f"bench-{uuid.uuid4().hex[:8]}")
    control = connect_control(control_addr)
    control.send(op="hello", bootstrap=peer.addr, key=peer.key)
    decode_start_s = control.recv()["start_s"]
    rows = {n: torch.frombuffer(bytearray(payload(n)), dtype=torch.uint8) for n in plan.sizes + [LATENCY_BYTES]}
    tags = iter(range(1, 1 << 30))

    def transfer(nbytes: int) -> float:
        control.send(op="post", tag=(tag := next(tags)), nbytes=nbytes)
        control.recv()  # ready
        t0 = time.perf_counter()
        tx = engine.sender(peer, tag)
        tx.send(rows[nbytes])
        control.recv()  # done
        elapsed = time.perf_counter() - t0
        if tx.result.result(timeout=WORKER_TIMEOUT_S) != KVPoll.SUCCESS:
            raise RuntimeError(tx.error)
        return elapsed

    def check(nbytes: int) -> None:
        control.send(op="digest")
        if control.recv()["digest"] != digest(rows[nbytes].numpy().data):
            raise RuntimeError(f"gloo: the {nbytes} bytes received differ from those sent")

    result = drive(plan, transfer, check)
    control.send(op="bye")
    engine.close()
    return {**result, "start_s": [start_s, decode_start_s]}


# --- mooncake: TransferEngine, tcp protocol, P2PHANDSHAKE metadata -----------------------------------


def mooncake_engine(nbytes: int) -> tuple[Any, str, mmap.mmap, float]:
    """A started engine, its session id, and a registered buffer of `nbytes`; the seconds it took."""
    from mooncake.engine import TransferEngine

    t = time.perf_counter()
    engine = TransferEngine()
    if (rc := engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "")) != 0:
        raise RuntimeError(f"mooncake initialize returned {rc}")
    buf = mmap.mmap(-1, nbytes)
    if (rc := engine.register_memory(address(buf), nbytes)) != 0:
        raise RuntimeError(f"mooncake register_memory returned {rc}")
    return engine, f"127.0.0.1:{engine.get_rpc_port()}", buf, time.perf_counter() - t


def mooncake_decode(plan: Plan) -> dict[str, Any]:
    engine, session, buf, start_s = mooncake_engine(max(plan.sizes + [LATENCY_BYTES]))
    control = listen_control()
    control.send(op="hello", session=session, addr=address(buf), start_s=start_s)
    while (msg := control.recv())["op"] != "bye":
        if msg["op"] == "written":
            control.send(op="done")
        elif msg["op"] == "digest":
            control.send(op="digest", digest=digest(memoryview(buf)[: msg["nbytes"]]))
    return {}


def mooncake_prefill(plan: Plan, control_addr: str) -> dict[str, Any]:
    largest = max(plan.sizes + [LATENCY_BYTES])
    engine, _, buf, start_s = mooncake_engine(largest)
    src = address(buf)
    control = connect_control(control_addr)
    hello = control.recv()
    session, dst = hello["session"], hello["addr"]
    buf[:largest] = payload(largest)  # a smaller payload is its prefix

    def transfer(nbytes: int) -> float:
        t0 = time.perf_counter()
        rc = engine.transfer_sync_write(session, src, dst, nbytes)
        if rc != 0:
            raise RuntimeError(f"mooncake transfer_sync_write of {nbytes} bytes returned {rc}")
        control.send(op="written", nbytes=nbytes)
        control.recv()  # done
        return time.perf_counter() - t0

    result = drive(plan, transfer, digest_check(control, buf, "mooncake"))
    control.send(op="bye")
    return {**result, "start_s": [start_s, hello["start_s"]]}


def digest_check(control: Any, buf: Any, backend: str) -> Any:
    """drive's check for a backend that writes into the decode side's buffer: the decode side's
    digest of the first nbytes against the sent bytes'."""

    def check(nbytes: int) -> None:
        control.send(op="digest", nbytes=nbytes)
        if control.recv()["digest"] != digest(memoryview(buf)[:nbytes]):
            raise RuntimeError(f"{backend}: the {nbytes} bytes received differ from those sent")

    return check


# --- nixl: an agent with the UCX backend, DRAM to DRAM ---------------------------------------------


def nixl_agent(name: str, nbytes: int) -> tuple[Any, mmap.mmap, float]:
    """A started agent and a registered buffer of `nbytes`; the seconds it took."""
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError:  # the wheel of nixl-cu12 alone, without the `nixl` meta package
        from nixl_cu12._api import nixl_agent, nixl_agent_config

    t = time.perf_counter()
    agent = nixl_agent(name, nixl_agent_config(backends=["UCX"]))
    buf = mmap.mmap(-1, nbytes)
    agent.register_memory([(address(buf), nbytes, 0, "")], "DRAM")
    return agent, buf, time.perf_counter() - t


def nixl_decode(plan: Plan) -> dict[str, Any]:
    agent, buf, start_s = nixl_agent("decode", max(plan.sizes + [LATENCY_BYTES]))
    control = listen_control()
    control.send(op="hello", metadata=base64.b64encode(agent.get_agent_metadata()).decode(),
                 addr=address(buf), start_s=start_s)
    while (msg := control.recv())["op"] != "bye":
        if msg["op"] == "written":
            control.send(op="done")
        elif msg["op"] == "digest":
            control.send(op="digest", digest=digest(memoryview(buf)[: msg["nbytes"]]))
    return {}


def nixl_prefill(plan: Plan, control_addr: str) -> dict[str, Any]:
    largest = max(plan.sizes + [LATENCY_BYTES])
    agent, buf, start_s = nixl_agent("prefill", largest)
    src = address(buf)
    control = connect_control(control_addr)
    hello = control.recv()
    metadata, dst = base64.b64decode(hello["metadata"]), hello["addr"]
    buf[:largest] = payload(largest)  # a smaller payload is its prefix
    remote: list[str] = []  # the decode agent's name, once added (the first transfer adds it)

    def transfer(nbytes: int) -> float:
        t0 = time.perf_counter()
        if not remote:
            remote.append(agent.add_remote_agent(metadata))
        handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs([(src, nbytes, 0)], "DRAM"),
                                       agent.get_xfer_descs([(dst, nbytes, 0)], "DRAM"), remote[0])
        state = agent.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = agent.check_xfer_state(handle)
        agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"nixl transfer of {nbytes} bytes failed")
        control.send(op="written", nbytes=nbytes)
        control.recv()  # done
        return time.perf_counter() - t0

    result = drive(plan, transfer, digest_check(control, buf, "nixl"))
    control.send(op="bye")
    return {**result, "start_s": [start_s, hello["start_s"]]}


WORKERS = {
    "gloo": (gloo_prefill, gloo_decode),
    "mooncake": (mooncake_prefill, mooncake_decode),
    "nixl": (nixl_prefill, nixl_decode),
}
IMPORTS = {
    "gloo": "import torch.distributed",
    "mooncake": "import mooncake.engine",
    "nixl": "try:\n import nixl._api\nexcept ImportError:\n import nixl_cu12._api",
}


# --- driver --------------------------------------------------------------------------------------------


def available(python: str, backend: str) -> str:
    """'' when `python` can import the backend, else why not."""
    probe = subprocess.run([python, "-c", IMPORTS[backend]], capture_output=True, text=True, timeout=120)
    if probe.returncode == 0:
        return ""
    lines = probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"]
    return lines[-1]


def run_backend(python: str, backend: str, argv: list[str], env: dict[str, str], logs: Path) -> dict[str, Any]:
    """Both workers of one backend; their stderr (Mooncake's and UCX's logs) goes to `logs`."""
    worker = [python, str(Path(__file__).resolve()), *argv, "--worker", backend]
    env = {**os.environ, **env}
    with open(logs / f"{backend}-decode.log", "w") as decode_log, open(logs / f"{backend}-prefill.log", "w") as prefill_log:
        decode = subprocess.Popen([*worker, "--role", "decode"], stdout=subprocess.PIPE, stderr=decode_log,
                                  text=True, env=env)
        try:
            assert decode.stdout is not None
            line: list[str] = []
            while (out := decode.stdout.readline()) and (line := out.split())[:1] != ["control"]:
                pass  # a library's logging on stdout (nixl's)
            if line[:1] != ["control"]:
                raise RuntimeError(f"{backend} decode worker did not start (exit {decode.wait(30)}; {decode_log.name})")
            prefill = subprocess.run([*worker, "--role", "prefill", "--control", f"127.0.0.1:{line[1]}"],
                                     stdout=subprocess.PIPE, stderr=prefill_log, text=True, env=env,
                                     timeout=WORKER_TIMEOUT_S)
            if prefill.returncode != 0:
                prefill_log.write(prefill.stdout)
                raise RuntimeError(f"{backend} prefill worker exited {prefill.returncode} (see {prefill_log.name}, "
                                   f"{decode_log.name})")
            decode.wait(60)
            return dict(json.loads(prefill.stdout.strip().splitlines()[-1]))
        finally:
            if decode.poll() is None:
                decode.kill()
                decode.wait()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def label(nbytes: int) -> tuple[str, str]:
    if nbytes % KV_BYTES_PER_TOKEN:
        return f"{nbytes / 1024:.0f} KiB", "-"
    return f"{nbytes / 1e6:.1f} MB", str(nbytes // KV_BYTES_PER_TOKEN)


def print_tables(results: dict[str, dict[str, Any]]) -> None:
    print("\n| backend | payload | tokens | median s | P90 s | GB/s (median) | us/token (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for backend, r in results.items():
        for size, xs in r["timings"].items():
            nbytes = int(size)
            payload_label, tokens = label(nbytes)
            med = statistics.median(xs)
            per_token = f"{1e6 * med * KV_BYTES_PER_TOKEN / nbytes:.2f}" if tokens != "-" else "-"
            print(f"| {backend} | {payload_label} | {tokens} | {med:.5f} | {pct(xs, 90):.5f} | "
                  f"{nbytes / med / 1e9:.2f} | {per_token} |")
    print("\nPair setup (one sample each)")
    print("| backend | engine start s (prefill, decode) | first 64 KiB transfer on a new pair s | warm 64 KiB median s |")
    print("| --- | --- | --- | --- |")
    for backend, r in results.items():
        prefill_s, decode_s = r["start_s"]
        warm = statistics.median(r["timings"][str(LATENCY_BYTES)])
        print(f"| {backend} | {prefill_s:.4f}, {decode_s:.4f} | {r['setup_s']:.4f} | {warm:.5f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="gloo,mooncake,nixl")
    ap.add_argument("--python-mooncake", default=sys.executable,
                    help="a python that can import mooncake.engine (a separate venv)")
    ap.add_argument("--python-nixl", default=sys.executable, help="a python that can import nixl (a separate venv)")
    ap.add_argument("--nixl-ucx-tls", default="tcp",
                    help="UCX_TLS for nixl's workers, comma-separated for one run each: tcp is what gloo and "
                         "Mooncake use here; all lets UCX pick shared memory, which only one host has")
    ap.add_argument("--logs", type=Path, default=Path(tempfile.gettempdir()) / "bench_kv_transfer",
                    help="where the workers' stderr goes")
    ap.add_argument("--tokens", default="256,2048,8192", help="prompt lengths, in SmolLM2-135M fp32 KV")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--role", choices=["prefill", "decode"], help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    args = ap.parse_args()
    plan = Plan([LATENCY_BYTES] + [int(t) * KV_BYTES_PER_TOKEN for t in args.tokens.split(",")],
                args.warmup, args.repeats)

    if args.worker:
        prefill, decode = WORKERS[args.worker]
        result = prefill(plan, args.control) if args.role == "prefill" else decode(plan)
        if result:
            print(json.dumps(result), flush=True)
        sys.stderr.flush()
        os._exit(0)  # no interpreter teardown: nixl-cu12 1.5.1's agent segfaults in it, after the work

    pythons = {"gloo": sys.executable, "mooncake": args.python_mooncake, "nixl": args.python_nixl}
    variants: dict[str, list[tuple[str, dict[str, str]]]] = {  # (label, the workers' extra environment)
        "gloo": [("gloo", {}), ("gloo, fresh buffers", {"BENCH_GLOO_FRESH": "1"})],
        "mooncake": [("mooncake tcp", {})],
        "nixl": [(f"nixl UCX_TLS={tls}", {"UCX_TLS": tls}) for tls in args.nixl_ucx_tls.split(",")],
    }
    args.logs.mkdir(parents=True, exist_ok=True)
    argv = ["--tokens", args.tokens, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    results: dict[str, dict[str, Any]] = {}
    for backend in args.backends.split(","):
        if backend not in WORKERS:
            raise SystemExit(f"unknown backend {backend!r}: one of {', '.join(WORKERS)}")
        if why := available(pythons[backend], backend):
            hint = {"mooncake": " (pass --python-mooncake, a venv with mooncake-transfer-engine-non-cuda)",
                    "nixl": " (pass --python-nixl, a venv with nixl)"}.get(backend, "")
            print(f"{backend}: skipped, {pythons[backend]} cannot import it: {why}{hint}")
            continue
        for name, env in variants[backend]:
            t = time.perf_counter()
            results[name] = run_backend(pythons[backend], backend, argv, env, args.logs)
            print(f"{name}: done in {time.perf_counter() - t:.1f} s ({pythons[backend]})")
    if results:
        print_tables(results)


if __name__ == "__main__":
    main()
