"""Container health checks: `python -m services.launcher.healthcheck SERVICE` exits 0 when healthy.

- gateway: its `/health` answers 200 (`DPSERVE_PORT` on localhost);
- scheduler: a DP leader's LoadReport arrives on the bus within the timeout;
- tokenizer, dispatcher, gateway: their MetricsSnapshot arrives (they publish one every second);
- detokenizer: the bus answers (it keeps no state to report).
Settings come from the same `DPSERVE_*` environment as the service.
"""

from __future__ import annotations

import asyncio
import sys
import urllib.request

import msgspec
import nats

from shared.bus import server_list
from shared.config import ServerArgs
from shared.messages import LoadReport
from shared.metrics import MetricsSnapshot
from shared.subjects import Subjects

TIMEOUT = 5.0


async def bus_check(args: ServerArgs, service: str) -> bool:
    subjects = Subjects(args.subject_prefix)
    servers = server_list(args.nats_url or "nats://127.0.0.1:4222")
    nc = await nats.connect(servers=servers, dont_randomize=True, connect_timeout=2, max_reconnect_attempts=0)
    try:
        if service == "detokenizer":
            await nc.flush(timeout=2)
            return True
        seen = asyncio.Event()

        async def on_msg(msg: nats.aio.msg.Msg) -> None:
            try:
                if service == "scheduler":
                    msgspec.msgpack.decode(msg.data, type=LoadReport)
                    seen.set()
                elif msgspec.msgpack.decode(msg.data, type=MetricsSnapshot).service == service:
                    seen.set()
            except msgspec.DecodeError:
                pass

        subject = subjects.load_all if service == "scheduler" else subjects.metrics
        await nc.subscribe(subject, cb=on_msg)
        try:
            await asyncio.wait_for(seen.wait(), TIMEOUT)
            return True
        except TimeoutError:
            return False
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("gateway", "tokenizer", "detokenizer", "dispatcher", "scheduler"):
        print("usage: python -m services.launcher.healthcheck gateway|tokenizer|detokenizer|dispatcher|scheduler")
        return 2
    args = ServerArgs.parse([])
    if argv[0] == "gateway":
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=TIMEOUT) as resp:
                return 0 if resp.status == 200 else 1
        except OSError:
            return 1
    return 0 if asyncio.run(bus_check(args, argv[0])) else 1


if __name__ == "__main__":
    sys.exit(main())
