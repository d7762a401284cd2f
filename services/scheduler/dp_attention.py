"""Where a scheduler rank sits in SGLang's parallel layout, and DP attention's layer builder.

One torch.distributed world per model replica, `tp_size` ranks. Without DP attention the whole
world is one attention group (plain TP) and `dp_size` replicas run as separate worlds. With
`--enable-dp-attention` (dp_size > 1) the world splits into `dp_size` DP groups of
`attn_tp_size = tp_size // dp_size` consecutive ranks:
    dp_rank = tp_rank // attn_tp_size        attn_tp_rank = tp_rank % attn_tp_size
Attention, embedding, LM head and the KV pool are per DP group (split over its attn_tp ranks);
the dense MLP and the MoE (experts and shared experts) are split over all tp_size ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from services.scheduler.model.config import MoEConfig
from services.scheduler.model.dist import TPLinears
from services.scheduler.model.parallel import Linears


@dataclass(frozen=True)
class ParallelLayout:
    tp_size: int  # ranks in this world
    tp_rank: int
    dp_groups: int  # DP attention groups inside this world (1: plain TP)

    @classmethod
    def from_args(cls, tp_size: int, dp_size: int, tp_rank: int, enable_dp_attention: bool) -> ParallelLayout:
        groups = dp_size if enable_dp_attention else 1
        if tp_size % groups:
            raise ValueError(f"--tp-size ({tp_size}) must be divisible by --dp-size ({dp_size}) with DP attention")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"--tp-rank {tp_rank} is outside [0, {tp_size})")
        return cls(tp_size, tp_rank, groups)

    @property
    def attn_tp_size(self) -> int:
        return self.tp_size // self.dp_groups

    @property
    def attn_tp_rank(self) -> int:
        return self.tp_rank % self.attn_tp_size

    @property
    def group_index(self) -> int:
        """This rank's DP group within the world (its dp_rank under DP attention)."""
        return self.tp_rank // self.attn_tp_size

    @property
    def is_leader(self) -> bool:
        """attn_tp_rank 0: the one rank of the group that talks to NATS."""
        return self.attn_tp_rank == 0

    @property
    def distributed(self) -> bool:
        return self.tp_size > 1

    def group_ranks(self, g: int) -> list[int]:
        return list(range(g * self.attn_tp_size, (g + 1) * self.attn_tp_size))


def new_attn_groups(layout: ParallelLayout) -> dist.ProcessGroup | None:
    """This rank's attention-group communicator. Every rank creates every group, in the same order
    (torch.distributed's rule); None when the group is the whole world."""
    if layout.dp_groups == 1:
        return None
    mine = None
    for g in range(layout.dp_groups):
        group = dist.new_group(layout.group_ranks(g))
        if g == layout.group_index:
            mine = group
    return mine


class DPAttentionLinears(Linears):
    """Attention layers split over the DP group, feed-forward layers over the world; around_mlp
    gathers every group's tokens for the feed-forward and gives this group its rows back.

    `step_tokens[g]` (tokens of DP group g this step) is set by the step sync before each forward,
    in the forward thread, from the all-gather every rank takes part in."""

    def __init__(self, layout: ParallelLayout, attn_group: dist.ProcessGroup | None) -> None:
        self.layout = layout
        self.tp_size, self.tp_rank = layout.tp_size, layout.tp_rank
        self._attn: Linears = (
            TPLinears(layout.attn_tp_rank, layout.attn_tp_size, attn_group) if layout.attn_tp_size > 1 else Linears()
        )
        self._mlp = TPLinears(layout.tp_rank, layout.tp_size)
        self.step_tokens: list[int] = [0] * layout.dp_groups

    @property
    def attn(self) -> Linears:
        return self._attn

    @property
    def mlp(self) -> Linears:
        return self._mlp

    def around_mlp(self, x: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        counts, lay = self.step_tokens, self.layout
        assert x.shape[0] == counts[lay.group_index], (x.shape, counts)
        width = max(counts)
        if width == 0:
            return x
        padded = x.new_zeros(width, x.shape[1])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(lay.tp_size)]
        dist.all_gather(parts, padded)
        # every rank of a group holds the same rows: take each group's leader's copy
        full = torch.cat([parts[g * lay.attn_tp_size][: counts[g]] for g in range(lay.dp_groups)])
        out = mlp(full)
        start = sum(counts[: lay.group_index])
        return out[start : start + x.shape[0]]

    def expert_ids(self, moe: MoEConfig) -> range:
        return self._mlp.expert_ids(moe)

    def is_remote(self, name: str, moe: MoEConfig | None) -> bool:
        return self._mlp.is_remote(name, moe)


def build_linears(layout: ParallelLayout, attn_group: dist.ProcessGroup | None) -> Linears | None:
    """The layer builder for this rank (None: plain single-device layers); `attn_group` from
    new_attn_groups."""
    if not layout.distributed:
        return None
    if layout.dp_groups == 1:
        return TPLinears(layout.tp_rank, layout.tp_size)
    return DPAttentionLinears(layout, attn_group)
