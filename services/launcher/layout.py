"""Which scheduler processes a deployment runs, as flag overrides for each child, and which of
them form one torch.distributed world (a restart group); on several nodes, this node's share
(placement: `nodes.node_of`) and the worlds node 0 coordinates.

With `--prefill-dp-size P --decode-dp-size D` the deployment has two sides, each laid out as a
deployment of its own (its dp, tp and DP attention) in worlds of its own, so a failure on one side
never restarts the other: the decode side serves global DP ranks [0, D), the prefill side [D, D+P).
A scheduler gets its side's layout and its local DP rank; everything else counts P + D ranks.
On several nodes the two sides' processes form one list, the decode side's first, cut into equal
shares like any deployment's (`nodes.node_of`): when the nodes split evenly between the sides,
the first nodes run the decode side and the others the prefill side (P = D = 2 on 2 nodes: node 0
decode-scheduler0, 1; node 1 prefill-scheduler2, 3); otherwise one node holds ranks of both. A
world never spans the sides, whatever the placement, and node 0 decides every world's epochs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from services.launcher.nodes import NodePlan, node_of, world_prefix
from services.launcher.supervisor import free_port
from shared.config import ServerArgs

ATTN_TP_MESSAGE = (
    "prefill/decode disaggregation needs attention TP 1 on each side (tp 1, or DP attention with dp = tp): "
    "the KV of one DP group is not split over TP ranks yet"
)


@dataclass(frozen=True)
class Side:
    """Scheduler worlds of one layout: the whole deployment (mode "null"), or one side of a
    disaggregated one, serving global DP ranks [dp_rank_base, dp_rank_base + dp_size)."""

    mode: str  # "null", "decode" or "prefill": the schedulers' --disaggregation-mode
    dp_size: int
    tp_size: int
    enable_dp_attention: bool
    dp_rank_base: int = 0

    @property
    def prefix(self) -> str:
        """Of its processes' and worlds' names: "decode-", "prefill-", or "" (not disaggregated)."""
        return "" if self.mode == "null" else f"{self.mode}-"

    @property
    def shape(self) -> str:
        return f"{self.dp_size} DP x {self.tp_size} TP"

    def flags(self) -> dict[str, object]:
        """Every scheduler of the side gets these (none when not disaggregated: the args hold them)."""
        if self.mode == "null":
            return {}
        return {
            "dp_size": self.dp_size,
            "tp_size": self.tp_size,
            "enable_dp_attention": self.enable_dp_attention,
            "disaggregation_mode": self.mode,
            "dp_rank_base": self.dp_rank_base,
        }


def sides(args: ServerArgs) -> list[Side]:
    """The decode side first (DP ranks from 0), then the prefill side; or the one layout."""
    if not args.disaggregated:
        return [Side("null", args.dp_size, args.tp_size, args.enable_dp_attention)]
    decode = Side("decode", args.decode_dp_size, args.decode_tp_size or args.tp_size,
                  args.decode_enable_dp_attention or args.enable_dp_attention)
    prefill = Side("prefill", args.prefill_dp_size, args.prefill_tp_size or args.tp_size,
                   args.prefill_enable_dp_attention or args.enable_dp_attention, dp_rank_base=args.decode_dp_size)
    return [decode, prefill]


def validate_sides(args: ServerArgs) -> None:
    """Raises ValueError naming the flags for a disaggregated layout serve cannot run yet."""
    if not args.disaggregated:
        return
    total = args.prefill_dp_size + args.decode_dp_size
    if args.dp_size not in (1, total):
        raise ValueError(f"--dp-size {args.dp_size} contradicts --prefill-dp-size {args.prefill_dp_size} + "
                         f"--decode-dp-size {args.decode_dp_size} ({total} DP ranks); leave --dp-size out")
    for side in sides(args):
        if side.tp_size != (side.dp_size if side.enable_dp_attention else 1):
            dpa = " with DP attention" if side.enable_dp_attention else ""
            raise ValueError(f"{side.mode} side {side.shape}{dpa}: {ATTN_TP_MESSAGE}")


def deployment_args(args: ServerArgs) -> ServerArgs:
    """The flags every child gets (a scheduler its side's `flags` on top) and the launcher counts by:
    dp_size P + D, each side's tp size and DP attention spelled out, and no deployment-wide
    --enable-dp-attention (it would ask tp_size to divide by P + D). Unchanged when not disaggregated."""
    if not args.disaggregated:
        return args
    decode, prefill = sides(args)
    return dataclasses.replace(
        args,
        dp_size=decode.dp_size + prefill.dp_size,
        enable_dp_attention=False,
        decode_tp_size=decode.tp_size,
        decode_enable_dp_attention=decode.enable_dp_attention,
        prefill_tp_size=prefill.tp_size,
        prefill_enable_dp_attention=prefill.enable_dp_attention,
    )


def scheduler_ranks(args: ServerArgs) -> list[dict[str, object]]:
    """The scheduler processes, as flag overrides: each side's `side_ranks` with the side's flags."""
    return [rank | side.flags() for side in sides(args) for rank in side_ranks(side)]


def side_ranks(side: Side) -> list[dict[str, object]]:
    """One side's scheduler processes (SGLang's layout), local DP ranks. Without DP attention:
    dp_size independent replicas of tp_size ranks, each replica its own torch.distributed world
    (its own TCP store port). With --enable-dp-attention: tp_size ranks in one world, rank r
    serving DP group r // (tp_size // dp_size)."""
    if side.tp_size == 1 and not side.enable_dp_attention:
        return [{"dp_rank": d} for d in range(side.dp_size)]
    if side.enable_dp_attention:
        addr = f"127.0.0.1:{free_port()}"
        attn_tp = side.tp_size // side.dp_size
        return [
            {"dp_rank": r // attn_tp, "tp_rank": r, "dist_init_addr": addr} for r in range(side.tp_size)
        ]
    out: list[dict[str, object]] = []
    for d in range(side.dp_size):
        addr = f"127.0.0.1:{free_port()}"
        out += [{"dp_rank": d, "tp_rank": r, "dist_init_addr": addr} for r in range(side.tp_size)]
    return out


def side_of(args: ServerArgs, rank: dict[str, object]) -> Side:
    mode = rank.get("disaggregation_mode", "null")
    return next(side for side in sides(args) if side.mode == mode)


def world_of(args: ServerArgs, rank: dict[str, object]) -> str:
    """The restart group of a scheduler process: its torch.distributed world (all its side's ranks
    with DP attention, else its replica, named by global DP rank), or "" for a rank alone."""
    side = side_of(args, rank)
    if side.tp_size == 1:
        return ""
    world = "schedulers" if side.enable_dp_attention else f"scheduler{side.dp_rank_base + int(rank['dp_rank'])}"
    return side.prefix + world


def process_name(args: ServerArgs, rank: dict[str, object]) -> str:
    """`scheduler1-tp0`, `prefill-scheduler2`: by global DP rank, and tp rank in a TP world."""
    side = side_of(args, rank)
    name = f"{side.prefix}scheduler{side.dp_rank_base + int(rank['dp_rank'])}"
    return name + (f"-tp{rank['tp_rank']}" if side.tp_size > 1 else "")


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
