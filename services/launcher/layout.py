"""Which scheduler processes a deployment runs, as flag overrides for each child, and which of
them form one torch.distributed world (a restart group); on several nodes, this node's share
(placement: `nodes.node_of`) and the worlds node 0 coordinates."""

from __future__ import annotations

from services.launcher.nodes import NodePlan, node_of, world_prefix
from services.launcher.supervisor import free_port
from shared.config import ServerArgs


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


def world_of(args: ServerArgs, rank: dict[str, object]) -> str:
    """The restart group of a scheduler process: its torch.distributed world (all ranks with DP
    attention, else its replica), or "" for a rank alone."""
    if args.tp_size == 1:
        return ""
    return "schedulers" if args.enable_dp_attention else f"scheduler{rank['dp_rank']}"


def node_ranks(args: ServerArgs, plan: NodePlan) -> list[dict[str, object]]:
    """This node's share of the scheduler processes (`nodes.node_of`); a world's ranks meet at
    node 0's rendezvous store under the world's prefix, epoch 0."""
    ranks = scheduler_ranks(args)
    mine = []
    for index, rank in enumerate(ranks):
        if node_of(index, len(ranks), args.nnodes) != plan.node_rank:
            continue
        if "dist_init_addr" in rank:
            prefix = world_prefix(world_of(args, rank), 0)
            rank = rank | {"dist_init_addr": plan.dist_init_addr, "dist_store_prefix": prefix}
        mine.append(rank)
    return mine


def node_worlds(args: ServerArgs, node_rank: int) -> dict[str, set[int]]:
    """The worlds of a multi-node deployment -> the nodes their ranks run on: every world for node 0
    (it decides their epochs), those with a rank here for the others. A world inside one node is
    one too: it meets at node 0's store, so it starts when node 0 is there, not before."""
    ranks = scheduler_ranks(args)
    nodes: dict[str, set[int]] = {}
    for index, rank in enumerate(ranks):
        if world := world_of(args, rank):
            nodes.setdefault(world, set()).add(node_of(index, len(ranks), args.nnodes))
    return {w: n for w, n in nodes.items() if node_rank == 0 or node_rank in n}
