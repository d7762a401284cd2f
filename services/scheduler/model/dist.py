"""Tensor- and expert-parallel layers over a torch.distributed group (gloo on CPU, NCCL on CUDA).

Each layer holds its shard and owns its collective, so a model reads as if on one device:
  ColumnParallelLinear  weight rows (output features) split; output stays sharded, no comm
  RowParallelLinear     weight columns (input features) split; partial sums all-reduced, then bias
  VocabParallelEmbedding rows [rank*V/tp, (rank+1)*V/tp) here; other ids give 0; all-reduced
  ParallelLMHead        vocab rows split; local logits all-gathered to the full vocab
Routed experts are split across the same group (EP): rank r holds experts
[r*E/tp, (r+1)*E/tp), runs them on every token, and the partial outputs are all-reduced.
Every parallel layer knows how to cut its shard from the full checkpoint tensor (shard_weight),
which the loader calls, so each rank reads only what it keeps in memory.
Collectives are skipped on an empty input (DP attention's idle batch): every rank of a group sees
the same batch, so a group skips together and stays in step.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from services.scheduler.model.config import MoEConfig
from services.scheduler.model.parallel import Linears

_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _split(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ValueError(f"{what} ({n}) is not divisible by tp_size ({tp_size})")
    return n // tp_size


class _Sharded(nn.Module):
    def __init__(self, group: dist.ProcessGroup | None, tp_rank: int, tp_size: int, dim: int) -> None:
        super().__init__()
        self.group, self.tp_rank, self.tp_size, self.shard_dim = group, tp_rank, tp_size, dim

    def shard_weight(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of checkpoint tensor `name` (a parameter of this module)."""
        if name == "bias" and self.shard_dim == 1:
            return full  # a row-parallel bias is added once, after the reduce
        dim = 0 if name == "bias" else self.shard_dim
        return full.chunk(self.tp_size, dim=dim)[self.tp_rank].contiguous()


class ColumnParallelLinear(_Sharded):
    def __init__(self, in_f: int, out_f: int, bias: bool, group, tp_rank: int, tp_size: int) -> None:  # noqa: ANN001
        super().__init__(group, tp_rank, tp_size, dim=0)
        local = _split(out_f, tp_size, "output features")
        self.weight = nn.Parameter(torch.empty(local, in_f))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(_Sharded):
    def __init__(self, in_f: int, out_f: int, bias: bool, group, tp_rank: int, tp_size: int) -> None:  # noqa: ANN001
        super().__init__(group, tp_rank, tp_size, dim=1)
        self.weight = nn.Parameter(torch.empty(out_f, _split(in_f, tp_size, "input features")))
        self.bias = nn.Parameter(torch.empty(out_f)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if y.numel():
            dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(_Sharded):
    def __init__(self, vocab: int, hidden: int, group, tp_rank: int, tp_size: int) -> None:  # noqa: ANN001
        super().__init__(group, tp_rank, tp_size, dim=0)
        local = _split(vocab, tp_size, "vocab_size")
        self.start, self.end = tp_rank * local, (tp_rank + 1) * local
        self.weight = nn.Parameter(torch.empty(local, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        here = (ids >= self.start) & (ids < self.end)
        x = F.embedding((ids - self.start).clamp(0, self.end - self.start - 1), self.weight)
        x = x * here[:, None].to(x.dtype)
        if x.numel():
            dist.all_reduce(x, group=self.group)
        return x


class ParallelLMHead(_Sharded):
    def __init__(self, hidden: int, vocab: int, group, tp_rank: int, tp_size: int) -> None:  # noqa: ANN001
        super().__init__(group, tp_rank, tp_size, dim=0)
        self.weight = nn.Parameter(torch.empty(_split(vocab, tp_size, "vocab_size"), hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()
        if not local.numel():
            return x.new_empty(x.shape[0], self.weight.shape[0] * self.tp_size)
        parts = [torch.empty_like(local) for _ in range(self.tp_size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


class TPLinears(Linears):
    """Builds the parallel layers for rank `tp_rank` of `group` (None: the default world)."""

    def __init__(self, tp_rank: int, tp_size: int, group: dist.ProcessGroup | None = None) -> None:
        self.tp_rank, self.tp_size, self.group = tp_rank, tp_size, group

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return ColumnParallelLinear(in_features, out_features, bias, self.group, self.tp_rank, self.tp_size)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return RowParallelLinear(in_features, out_features, bias, self.group, self.tp_rank, self.tp_size)

    def embedding(self, vocab_size: int, hidden_size: int) -> nn.Module:
        return VocabParallelEmbedding(vocab_size, hidden_size, self.group, self.tp_rank, self.tp_size)

    def lm_head(self, hidden_size: int, vocab_size: int) -> nn.Module:
        return ParallelLMHead(hidden_size, vocab_size, self.group, self.tp_rank, self.tp_size)

    def expert_ids(self, moe: MoEConfig) -> range:
        n = _split(moe.n_routed_experts, self.tp_size, "n_routed_experts")
        return range(self.tp_rank * n, (self.tp_rank + 1) * n)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel():
            dist.all_reduce(x, group=self.group)
        return x

    def is_remote(self, name: str, moe: MoEConfig | None) -> bool:
        """Whether checkpoint tensor `name` belongs to another rank (a routed expert not here)."""
        m = _EXPERT.search(name)
        return m is not None and moe is not None and int(m.group(1)) not in self.expert_ids(moe)
