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


def fuse_linears(parts: list[nn.Module]) -> nn.Linear | None:
    """One Linear computing `parts` side by side (outputs concatenated), so a step runs one GEMM
    instead of several; each part's parameters become views of the fused ones (no second copy).
    None unless every part is a plain single-device nn.Linear (tensor-parallel shards keep their
    own layers and collectives)."""
    if not all(type(p) is nn.Linear for p in parts):
        return None
    linears: list[nn.Linear] = parts  # type: ignore[assignment]
    has_bias = linears[0].bias is not None
    if any((p.bias is not None) != has_bias for p in linears):
        return None
    w = linears[0].weight
    fused = nn.Linear(w.shape[1], sum(p.out_features for p in linears), bias=has_bias, device=w.device, dtype=w.dtype)
    fused.requires_grad_(False)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias for p in linears]))  # type: ignore[misc]
        start = 0
        for p in linears:
            end = start + p.out_features
            p.weight.data = fused.weight.data[start:end]
            if has_bias:
                p.bias.data = fused.bias.data[start:end]  # type: ignore[union-attr]
            start = end
    return fused
