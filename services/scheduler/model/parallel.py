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


def keep_out_of_state_dict(module: nn.Module, name: str) -> None:
    """`module.<name>` (a fused layer whose parameters are the parts' own, concatenated) stays out
    of `module.state_dict()`, which keeps the checkpoint's keys."""

    def drop(_module: nn.Module, state_dict: dict[str, object], prefix: str, _meta: object) -> None:
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            del state_dict[key]

    module.register_state_dict_post_hook(drop)


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
    blocks = [getattr(p, "gguf_blocks", None) for p in linears]
    if all(b is not None and b[0] == blocks[0][0] for b in blocks):  # type: ignore[index]
        fused.gguf_blocks = (blocks[0][0], torch.cat([b[1] for b in blocks]))  # type: ignore[index]
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


class CpuLinear(nn.Module):
    """A float32 CPU Linear for serving. Its weight is reordered once into oneDNN's blocked GEMM
    layout: up to 2x faster than F.linear for the 8-300 row GEMMs of decode steps (the LM head
    at batch 32: 42 vs 75 ms on one AVX2 core). With `gguf_blocks` (the weight's GGUF blocks,
    which decode to exactly this weight) a step of at most `GGUF_ROWS` rows runs the C kernel
    over the blocks instead, reading 0.625 (Q4_1) or 1.06 (Q8_0) bytes a weight instead of 4:
    such steps are bound by the bytes they read. (SmolLM2-135M decode steps on one core: batch 1
    40-50 vs 110 ms, batch 32 300 vs 353 ms; batch 64 738 vs 467 ms, where the GEMM is bound by
    arithmetic and oneDNN wins.) Keeps the original `weight` and `bias` parameters, so names,
    ties and views are unchanged."""

    GGUF_ROWS = 32  # with one torch thread; divided by the thread count

    def __init__(self, linear: nn.Linear, gguf_blocks: tuple[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        from services.scheduler.cpu import load_gguf_linear

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 64),
                             persistent=False)
        self._gguf = load_gguf_linear() if gguf_blocks is not None else None
        self.gguf_blocks = gguf_blocks if self._gguf is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        if rows == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        # the C kernel runs on this thread alone: with more torch threads oneDNN wins sooner
        if self.gguf_blocks is not None and rows <= self.GGUF_ROWS // torch.get_num_threads():
            assert self._gguf is not None
            qtype, blocks = self.gguf_blocks
            out = self._gguf(flat.contiguous(), blocks, qtype)
            if self.bias is not None:
                out += self.bias
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def serve_linears_on_cpu(model: nn.Module) -> int:
    """Replaces every plain float32 CPU nn.Linear that runs (not one whose weight is a view into
    a fused projection) with a CpuLinear, handing on the GGUF blocks the loader attached
    (`gguf_blocks` attributes); returns how many. A no-op without oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype == torch.float32
        and child.weight._base is None  # q/k/v, gate/up: views of the fused layer that runs instead
    ]
    for parent, name, child in targets:
        setattr(parent, name, CpuLinear(child, getattr(child, "gguf_blocks", None)))
    return len(targets)
