"""Where a multi-node deployment's parts run and how the nodes find each other.

Every node runs `dpserve serve` with the same layout flags, its own `--node-rank` and node 0's
address in `--dist-init-addr`. From those alone each node derives the same plan:

- **Placement.** The scheduler processes in SGLang's order (replica-major, tp rank minor; with DP
  attention the one world's tp ranks; with prefill and decode apart, the decode side's and then
  the prefill side's, `layout.py`) are cut into `nnodes` equal consecutive shares: process `g`
  of `P` runs on node `g * nnodes // P`. A world that spans nodes therefore gives node k its tp
  ranks `[k*T/N, (k+1)*T/N)`, and whenever a replica or an attention group fits in one node's share
  it stays inside that node (tp 4 dp 2 with DP attention on 2 nodes: each node holds one group).
- **Addresses.** Everything a node serves binds its `--node-addr`, never loopback nor the wildcard:
  its nats-server (client and cluster ports), gloo (the interface holding the address, passed to
  the ranks as GLOO_SOCKET_IFNAME), and on node 0 the rendezvous store at `--dist-init-addr`.
  The default node address is the source address of this host's route to the dist-init host,
  which is the address the other nodes can reach it on.
- **Bus.** One nats-server per node, clustered (name `dpserve`, routes to node 0's cluster port
  unless `--nats-routes` says otherwise; with NATS auth the routes authenticate too); each service
  lists its own node's server first and node 0's as the fallback; the servers gossip the rest of
  the cluster to the clients.
- **Rendezvous.** Node 0 hosts one TCP store at `--dist-init-addr` (`rendezvous.py`); every
  torch.distributed world keeps its keys under its own prefix `world-name/epoch`, so a world
  restarts on a new epoch at the same address instead of on a new port.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import urllib.parse
from dataclasses import dataclass

from shared.config import ServerArgs

DEFAULT_NATS_PORT = 4222  # a node's client port when several nodes must know each other's
CLUSTER_NAME = "dpserve"
ROUTE_USER = "dpserve-route"  # the user nats-server routes authenticate as, when the bus has auth
SIOCGIFADDR = 0x8915


def split_host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def route_source_addr(host: str) -> str:
    """The local address the kernel would send from to reach `host` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), 9))
        return str(s.getsockname()[0])


def interface_of(addr: str) -> str:
    """The network interface that holds IPv4 address `addr` (what gloo must bind on this node)."""
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on it
                continue
        if socket.inet_ntoa(raw[20:24]) == addr:
            return name
    raise ValueError(f"no network interface holds {addr} (--node-addr); pass --gloo-socket-ifname")


@dataclass(frozen=True)
class NodePlan:
    """What this node runs and where it binds, the same on every node for the same flags."""

    nnodes: int
    node_rank: int
    node_addr: str
    dist_init_addr: str  # node 0's rendezvous store
    nats_port: int
    nats_cluster_port: int
    nats_routes: tuple[str, ...]
    gloo_ifname: str

    @classmethod
    def from_args(cls, args: ServerArgs) -> NodePlan:
        """Resolves the defaults (node address, NATS ports and routes, gloo interface) on this host."""
        store_host, _ = split_host_port(args.dist_init_addr)
        node_addr = args.node_addr or route_source_addr(store_host)
        routes = [r.strip() for r in args.nats_routes.split(",") if r.strip()]
        if not routes and args.node_rank != 0:
            routes = [f"nats://{store_host}:{args.nats_cluster_port}"]
        return cls(
            nnodes=args.nnodes,
            node_rank=args.node_rank,
            node_addr=node_addr,
            dist_init_addr=args.dist_init_addr,
            nats_port=args.nats_port or DEFAULT_NATS_PORT,
            nats_cluster_port=args.nats_cluster_port,
            nats_routes=tuple(routes),
            gloo_ifname=args.gloo_socket_ifname or interface_of(node_addr),
        )

    @property
    def is_head(self) -> bool:
        """Node 0: the gateway, tokenizer, dispatcher, detokenizer and the rendezvous store."""
        return self.node_rank == 0

    @property
    def node0_addr(self) -> str:
        return split_host_port(self.dist_init_addr)[0]

    @property
    def nats_url(self) -> str:
        """The services' server list: this node's nats-server first, node 0's as the fallback."""
        urls = [f"nats://{self.node_addr}:{self.nats_port}"]
        if not self.is_head:
            urls.append(f"nats://{self.node0_addr}:{self.nats_port}")
        return ",".join(urls)

    def nats_cluster_argv(self) -> list[str]:
        """nats-server flags that join this node's server to the others' (a bus without auth)."""
        argv = ["--cluster_name", CLUSTER_NAME, "--cluster", f"nats://{self.node_addr}:{self.nats_cluster_port}"]
        if self.nats_routes:
            argv += ["--routes", ",".join(self.nats_routes)]
        return argv

    def nats_cluster_conf(self, secret: str) -> str:
        """The same as a nats-server config block for a bus with auth: the routes authenticate too
        (user ROUTE_USER, the bus's password or token as password), or whoever reaches the cluster
        port would join the bus as a server. It holds the secret: it goes in the 0600 config file."""
        listen = f"{self.node_addr}:{self.nats_cluster_port}"
        routes = [with_credentials(route, ROUTE_USER, secret) for route in self.nats_routes]
        auth = f"{{ user: {json.dumps(ROUTE_USER)}, password: {json.dumps(secret)} }}"
        return (
            f"cluster {{ name: {json.dumps(CLUSTER_NAME)}, listen: {json.dumps(listen)}, authorization {auth}, "
            f"routes: {json.dumps(routes)} }}"
        )


def with_credentials(url: str, user: str, password: str) -> str:
    """nats://host:port -> nats://user:password@host:port (a URL that has credentials keeps them)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username:
        return url
    netloc = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}@{parts.netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def node_of(index: int, total: int, nnodes: int) -> int:
    """The node of scheduler process `index` of `total` (equal consecutive shares)."""
    return index * nnodes // total


def world_prefix(world: str, epoch: int) -> str:
    """A world's key prefix in the rendezvous store: a restarted world uses a new epoch."""
    return f"{world}/{epoch}"
