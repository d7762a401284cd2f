"""DeepSeek's feed-forward blocks: the gated MLP (dense layers, shared experts) and the MoE layer.

Routing (MoEGate), in float32 whatever the activation dtype:
  scores  = sigmoid(logits) (V3) or softmax(logits) (V2)
  choice  = scores + e_score_correction_bias (V3; the bias steers selection only, never weights)
  groups  = experts split into n_group equal groups; only the topk_group best groups stay
            eligible, a group scored by the sum of its top-2 choices (V3 "noaux_tc") or by its
            max score (V2 "group_limited_greedy"); "greedy" has no group limit
  ids     = top num_experts_per_tok eligible experts; weights = scores at ids
  weights normalized to sum 1 if norm_topk_prob; times routed_scaling_factor (V3 always; V2 only
            when not normalized, as DeepSeek-V2's code does)
Output = sum_k weights[k] * expert_ids[k](x) + shared_experts(x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from services.scheduler.model.config import ModelConfig, MoEConfig
from services.scheduler.model.parallel import Linears, fuse_linears, keep_out_of_state_dict


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-split and down row-split under TP."""

    def __init__(self, hidden_size: int, intermediate_size: int, linears: Linears | None = None) -> None:
        super().__init__()
        lin = linears or Linears()
        self.gate_proj = lin.column(hidden_size, intermediate_size, bias=False)
        self.up_proj = lin.column(hidden_size, intermediate_size, bias=False)
        self.down_proj = lin.row(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        """After loading: gate and up as one GEMM (single-device layers only)."""
        self.gate_up_proj = fuse_linears([self.gate_proj, self.up_proj])
        keep_out_of_state_dict(self, "gate_up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.n_routed_experts, hidden_size))
        self.e_score_correction_bias: nn.Parameter | None = None
        if moe.has_correction_bias:
            self.e_score_correction_bias = nn.Parameter(
                torch.zeros(moe.n_routed_experts), requires_grad=False
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights float32 [T, k], expert ids long [T, k]) for x [T, hidden]."""
        m = self.moe
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if m.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.float()
        if m.topk_method != "greedy" and m.n_group > 1:
            grouped = choice.view(-1, m.n_group, m.n_routed_experts // m.n_group)
            if m.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            best = group_scores.topk(m.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            keep = keep.repeat_interleave(m.n_routed_experts // m.n_group, dim=1)
            # V3 masks the biased choice with -inf; V2 masks softmax scores (all > 0) with 0.
            choice = choice.masked_fill(~keep, float("-inf") if m.topk_method == "noaux_tc" else 0.0)
        ids = choice.topk(m.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        normalize = m.norm_topk_prob and (m.scoring_func == "sigmoid" or m.num_experts_per_tok > 1)
        if normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if m.scoring_func == "sigmoid" or not normalize:
            weights = weights * m.routed_scaling_factor
        return weights, ids


class DeepseekMoE(nn.Module):
    """Routed experts (this rank's `expert_ids`; all of them on one device) plus shared experts.

    Under expert parallelism each rank runs only its experts on every token and `reduce`
    (an all-reduce over the EP group) sums the partial outputs; the shared experts are split
    by tensor parallelism and reduce themselves (their down_proj is row-parallel)."""

    def __init__(
        self,
        config: ModelConfig,
        linears: Linears | None = None,
        expert_ids: range | None = None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        hidden = config.hidden_size
        self.gate = MoEGate(hidden, moe)
        ids = expert_ids if expert_ids is not None else range(moe.n_routed_experts)
        # Keyed by global expert id, so parameter names match the checkpoint on every rank.
        self.experts = nn.ModuleDict({str(e): MLP(hidden, moe.moe_intermediate_size) for e in ids})
        self._local = [(e, self.experts[str(e)]) for e in ids]
        self.shared_experts: MLP | None = None
        if moe.n_shared_experts:
            self.shared_experts = MLP(hidden, moe.moe_intermediate_size * moe.n_shared_experts, linears)
        self.reduce = reduce
        self._fused: Callable[..., torch.Tensor] | None = None
        self.w13: torch.Tensor | None = None  # [E_local, 2 * inter, hidden], set by use_triton
        self.w2: torch.Tensor | None = None  # [E_local, hidden, inter]

    def use_triton(self) -> None:
        """Routed experts through the grouped-GEMM kernel. Their weights are stacked once (after
        loading) and each expert's parameters become views of the stack, so memory is not doubled."""
        from services.scheduler.kernels.moe import fused_moe

        ids = [e for e, _ in self._local]
        if not ids:  # an EP rank holding no routed expert: the torch loop is already a no-op
            return
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"the fused MoE kernel needs a contiguous range of local experts, got {ids}")
        experts = [expert for _, expert in self._local]
        inter = experts[0].gate_proj.weight.shape[0]
        with torch.no_grad():
            self.w13 = torch.stack([torch.cat([x.gate_proj.weight, x.up_proj.weight]) for x in experts])
            self.w2 = torch.stack([x.down_proj.weight for x in experts])
            for i, x in enumerate(experts):
                x.gate_up_proj = None  # the stack replaces the fused copy
                x.gate_proj.weight.data = self.w13[i, :inter]
                x.up_proj.weight.data = self.w13[i, inter:]
                x.down_proj.weight.data = self.w2[i]
        self._expert_start = ids[0]
        self._fused = fused_moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self._fused is not None:
            out = self._fused(x.contiguous(), self.w13, self.w2, weights, ids, expert_start=self._expert_start)
        else:
            out = torch.zeros_like(x)
            for e, expert in self._local:
                tok, k = (ids == e).nonzero(as_tuple=True)
                if tok.numel():
                    y = expert(x[tok]) * weights[tok, k, None]
                    out.index_add_(0, tok, y.to(out.dtype))
        if self.reduce is not None:
            out = self.reduce(out)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
