"""The embedded nats-servers of a multi-node deployment form one cluster, and with NATS auth on
the routes authenticate too: two real servers (as node 0 and node 1 would start them, here both
on loopback ports) carry a message from one to the other, while a server that routes to node 0
without the secret is refused and never sees the bus's traffic. No secret shows in argv."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from services.launcher.nodes import NodePlan
from services.launcher.supervisor import free_port, nats_server_argv, nats_server_binary, wait_port
from shared.config import ServerArgs

SECRET = "s3cr3t:/@pass"  # characters a URL must quote


def plan(node: int, port: int, cluster_port: int, routes: tuple[str, ...]) -> NodePlan:
    return NodePlan(2, node, "127.0.0.1", "127.0.0.1:1", port, cluster_port, routes, "lo")


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[tuple[int, list[str]]]]:
    args = ServerArgs.parse(["--nats-user", "dp", "--nats-password", SECRET])
    ports = [(free_port(), free_port()) for _ in range(3)]
    node0 = plan(0, *ports[0], ())
    node1 = plan(1, *ports[1], (f"nats://127.0.0.1:{ports[0][1]}",))
    started = []
    for k, p in enumerate((node0, node1)):
        conf_dir = tmp_path / f"node{k}"
        conf_dir.mkdir()
        argv = nats_server_argv(p.nats_port, args, conf_dir, host="127.0.0.1", cluster=p)
        started.append((p.nats_port, argv, subprocess.Popen(argv, stderr=subprocess.DEVNULL)))
    # a stranger: routes to node 0's cluster port without the secret
    stranger = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(ports[2][0]), "--cluster_name", "dpserve",
                "--cluster", f"nats://127.0.0.1:{ports[2][1]}", "--routes", f"nats://127.0.0.1:{ports[0][1]}"]
    started.append((ports[2][0], stranger, subprocess.Popen(stranger, stderr=subprocess.DEVNULL)))
    try:
        for port, _, _ in started:
            wait_port("127.0.0.1", port, timeout=10)
        yield [(port, argv) for port, argv, _ in started]
    finally:
        for _, _, proc in started:
            proc.terminate()
            proc.wait(10)


async def _relay(sub_url: str, pub_url: str, sub_creds: dict[str, str], pub_creds: dict[str, str], wait: float) -> bool:
    """Does a message published at `pub_url` reach a subscriber at `sub_url` within `wait` s?"""
    sub = await nats.connect(sub_url, **sub_creds)
    pub = await nats.connect(pub_url, **pub_creds)
    try:
        got = asyncio.Event()

        async def on_msg(_msg: object) -> None:
            got.set()

        await sub.subscribe("dpserve.probe", cb=on_msg)
        await sub.flush()
        deadline = asyncio.get_running_loop().time() + wait
        while not got.is_set() and asyncio.get_running_loop().time() < deadline:
            await pub.publish("dpserve.probe", b"x")  # again until the route and interest are up
            await pub.flush()
            await asyncio.sleep(0.1)
        return got.is_set()
    finally:
        await sub.close()
        await pub.close()


def test_routes_authenticate_and_carry_the_bus(servers: list[tuple[int, list[str]]]) -> None:
    (port0, argv0), (port1, argv1), (port2, _) = servers
    creds = {"user": "dp", "password": SECRET}
    assert all(SECRET not in " ".join(argv) for argv in (argv0, argv1))  # the routes' secret is in the 0600 file
    conf = Path(argv1[argv1.index("-c") + 1])
    assert conf.stat().st_mode & 0o777 == 0o600 and "dpserve-route" in conf.read_text()
    node0, node1, stranger = (f"nats://127.0.0.1:{p}" for p in (port0, port1, port2))
    # node 1 -> node 0 over the authenticated route
    assert asyncio.run(_relay(node0, node1, creds, creds, wait=10))
    # the stranger's route is refused: what is published there never reaches node 0's subscribers
    assert not asyncio.run(_relay(node0, stranger, creds, {}, wait=2))
