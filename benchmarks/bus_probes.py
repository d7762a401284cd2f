"""Small NATS clients that bench_multinode.py starts inside a node's network namespace.

    tap URL OUT SUBJECT...     subscribes to the dispatcher -> rank subjects (`dpserve.sched.R.req`)
                               beside the ranks; per TokenizedRequest one line "R rid seconds", the
                               seconds from the gateway receiving it (its `created`, wall clock)
                               to its delivery here. Every namespace shares this machine's clock.
    echo URL SUBJECT           answers every request on SUBJECT with its own payload.
    ping URL OUT SUBJECT...    request/reply round trips, the subjects interleaved, with a payload
                               the size of an encoded TokenizedRequest of --input-ids tokens; the
                               round trips in seconds per subject, as JSON in OUT.

tap and echo print "ready" once their subscriptions reached the server, and run until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import msgspec
import nats
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.messages import TokenizedRequest, encode  # noqa: E402


async def until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()


async def tap(url: str, out: Path, subjects: list[str]) -> None:
    nc = await nats.connect(url, name="bench-tap")
    decoder = msgspec.msgpack.Decoder(TokenizedRequest)
    with open(out, "a") as f:

        async def on_msg(msg: Msg) -> None:
            now = time.time()
            req = decoder.decode(msg.data)
            f.write(f"{msg.subject.split('.')[-2]} {req.rid} {now - req.created:.6f}\n")
            f.flush()

        for subject in subjects:
            await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        await until_terminated()
    await nc.drain()


async def echo(url: str, subject: str) -> None:
    nc = await nats.connect(url, name="bench-echo")

    async def on_msg(msg: Msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    await until_terminated()
    await nc.drain()


async def ping(url: str, out: Path, subjects: list[str], samples: int, input_ids: int) -> None:
    nc = await nats.connect(url, name="bench-ping")
    payload = encode(TokenizedRequest(rid="0" * 32, gateway_id="0" * 32, input_ids=list(range(1000, 1000 + input_ids)),
                                      created=time.time(), dispatch_id=1))
    deadline = time.monotonic() + 20
    for subject in subjects:  # until each responder's interest has reached this server
        while True:
            try:
                await nc.request(subject, payload, timeout=0.5)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
    for _ in range(50):  # warm-up
        for subject in subjects:
            await nc.request(subject, payload, timeout=2)
    rtts: dict[str, list[float]] = {s: [] for s in subjects}
    for _ in range(samples):
        for subject in subjects:
            t0 = time.perf_counter()
            await nc.request(subject, payload, timeout=2)
            rtts[subject].append(time.perf_counter() - t0)
    out.write_text(json.dumps({"payload_bytes": len(payload), "rtts": rtts}))
    await nc.drain()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="role", required=True)
    t = sub.add_parser("tap")
    t.add_argument("url")
    t.add_argument("out", type=Path)
    t.add_argument("subjects", nargs="+")
    e = sub.add_parser("echo")
    e.add_argument("url")
    e.add_argument("subject")
    q = sub.add_parser("ping")
    q.add_argument("url")
    q.add_argument("out", type=Path)
    q.add_argument("subjects", nargs="+")
    q.add_argument("--samples", type=int, default=2000)
    q.add_argument("--input-ids", type=int, default=190)
    ns = p.parse_args()
    if ns.role == "tap":
        asyncio.run(tap(ns.url, ns.out, ns.subjects))
    elif ns.role == "echo":
        asyncio.run(echo(ns.url, ns.subject))
    else:
        asyncio.run(ping(ns.url, ns.out, ns.subjects, ns.samples, ns.input_ids))


if __name__ == "__main__":
    main()
