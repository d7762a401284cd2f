"""Network namespaces as hosts, for the multi-node tests.

One namespace per node, each with a veth whose other end is on a bridge in a switch namespace (a
fresh network stack, so the host's firewall rules never see the traffic), and one more veth from
the switch to this (the test's) namespace, so the test reaches node addresses directly. The
addresses are a private /24 picked from the pid; the nodes have no route anywhere else. Each
node's processes start under `ip netns exec`.

`Hosts.create` raises `NamespacesUnavailable` (the caller skips with its reason) when this
machine cannot make namespaces; `close` removes every namespace and link it made, and is safe
to call after a partial setup.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


class NamespacesUnavailable(RuntimeError):
    pass


def _ip(*argv: str, ns: str = "") -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *argv] if ns else ["ip", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise NamespacesUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()}")


@dataclass
class Hosts:
    prefix: str
    subnet: str  # "10.a.b" of 10.a.b.0/24
    nnodes: int
    namespaces: list[str] = field(default_factory=list)
    host_link: str = ""

    @classmethod
    def create(cls, nnodes: int) -> Hosts:
        if shutil.which("ip") is None:
            raise NamespacesUnavailable("the `ip` command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise NamespacesUnavailable("creating network namespaces needs root")
        pid = os.getpid()
        hosts = cls(prefix=f"dpt{pid % 100000}", subnet=f"10.{200 + pid % 50}.{pid // 50 % 250}", nnodes=nnodes)
        try:
            hosts._build()
        except BaseException:
            hosts.close()
            raise
        return hosts

    def node_ns(self, k: int) -> str:
        return f"{self.prefix}-n{k}"

    def node_addr(self, k: int) -> str:
        return f"{self.subnet}.{k + 1}"

    @property
    def host_addr(self) -> str:
        return f"{self.subnet}.254"

    def _build(self) -> None:
        sw = f"{self.prefix}-sw"
        _ip("netns", "add", sw)
        self.namespaces.append(sw)
        _ip("link", "set", "lo", "up", ns=sw)
        _ip("link", "add", "br0", "type", "bridge", ns=sw)
        _ip("link", "set", "br0", "up", ns=sw)
        for k in range(self.nnodes):
            ns, link = self.node_ns(k), f"{self.prefix}n{k}"
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "add", link, "type", "veth", "peer", "name", link + "b")
            _ip("link", "set", link, "netns", ns)
            _ip("link", "set", link + "b", "netns", sw)
            _ip("link", "set", link + "b", "master", "br0", "up", ns=sw)
            _ip("addr", "add", f"{self.node_addr(k)}/24", "dev", link, ns=ns)
            _ip("link", "set", link, "up", ns=ns)
        self.host_link = f"{self.prefix}h"
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.host_link + "b")
        _ip("link", "set", self.host_link + "b", "netns", sw)
        _ip("link", "set", self.host_link + "b", "master", "br0", "up", ns=sw)
        _ip("addr", "add", f"{self.host_addr}/24", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")

    def link(self, k: int, up: bool) -> None:
        """Pulls node k's cable (its veth down) or puts it back."""
        _ip("link", "set", f"{self.prefix}n{k}", "up" if up else "down", ns=self.node_ns(k))

    def popen(self, k: int, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """`argv` on node k (its own session, so the test can signal its whole tree)."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", self.node_ns(k), *argv], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env,
            )

    def close(self) -> None:
        """Kills whatever still runs in the namespaces, then removes them and the links."""
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        if self.host_link:
            subprocess.run(["ip", "link", "del", self.host_link], capture_output=True)
            self.host_link = ""


def listening(pid: int) -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket listening in the network namespace of `pid`
    (/proc/PID/net/tcp and tcp6 show that namespace's sockets)."""
    out: set[tuple[str, int]] = set()
    for name, width in (("tcp", 8), ("tcp6", 32)):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            hex_addr, hex_port = parts[1].split(":")
            out.add((_address(hex_addr, width), int(hex_port, 16)))
    return out


def _address(hex_addr: str, width: int) -> str:
    raw = bytes.fromhex(hex_addr)
    if width == 8:  # little-endian IPv4
        return ".".join(str(b) for b in reversed(raw))
    words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]  # four little-endian 32-bit words
    full = b"".join(words)
    if full[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in full[12:])
    return ":".join(full[i : i + 2].hex() for i in range(0, 16, 2))
