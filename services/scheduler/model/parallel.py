"""How model layers build their linear maps: `Linears` makes plain single-device layers; the
tensor-parallel builder (dist.py's TPLinears) makes layers that hold a shard and own their
collective; DP attention (scheduler/dp_attention.py) pairs two of them.

A model is written once against this interface: `column` splits the output features across
ranks (no communication; the next layer consumes the shard), `row` splits the input features
and all-reduces the partial sums, so a column -> row pair costs one all-reduce. `expert_ids` is
the slice of routed experts this rank holds (EP), whose partial sums `reduce` adds up.

Attention (and embedding / LM head) layers are built with `attn`, feed-forward layers (dense MLP,
MoE) with `mlp`; both are this builder except under DP attention, where attention is split over
the rank's DP group and the feed-forward over the whole world. `around_mlp` runs a feed-forward
block on this rank's tokens: a plain call, or (DP attention) gather every group's tokens, run,
take this group's rows back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from services.scheduler.model.config import MoEConfig


class Linears:
    tp_size = 1
    tp_rank = 0

    @property
    def attn(self) -> Linears:
        return self

    @property
    def mlp(self) -> Linears:
        return self

    def around_mlp(self, x: torch.Tensor, mlp: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return mlp(x)

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def embedding(self, vocab_size: int, hidden_size: int) -> nn.Module:
        return nn.Embedding(vocab_size, hidden_size)

    def lm_head(self, hidden_size: int, vocab_size: int) -> nn.Module:
        """Maps [N, hidden] to full logits [N, vocab] on every rank."""
        return nn.Linear(hidden_size, vocab_size, bias=False)

    def expert_ids(self, moe: MoEConfig) -> range:
        return range(moe.n_routed_experts)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x
