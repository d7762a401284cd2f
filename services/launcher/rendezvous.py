"""Node 0's rendezvous store: `python -m services.launcher.rendezvous HOST:PORT`.

One torch.distributed TCPStore server for every world of a multi-node deployment (each world keys
its rendezvous under its own `world/epoch` prefix, `nodes.world_prefix`). It lives in its own
process, beside the ranks rather than inside one of them, so a world that breaks and restarts
finds the store where it was. The listening socket is bound here to HOST exactly and handed to
the store, because TCPStore itself would bind every interface.
"""

from __future__ import annotations

import datetime
import logging
import signal
import socket
import sys
import threading

from services.launcher.nodes import split_host_port
from shared.log import setup_logging

log = logging.getLogger("rendezvous")


def listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m services.launcher.rendezvous HOST:PORT", file=sys.stderr)
        return 2
    setup_logging("rendezvous", "info")
    host, port = split_host_port(argv[0])
    sock = listen(host, port)
    import torch.distributed as dist  # after the bind: a taken port fails in milliseconds, not seconds

    store = dist.TCPStore(
        host, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.fileno(),
        timeout=datetime.timedelta(seconds=30), use_libuv=False,
    )
    log.info("rendezvous store listening on %s:%d", host, port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
