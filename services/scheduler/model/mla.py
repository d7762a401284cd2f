"""Multi-head latent attention (DeepSeek V2/V3) over an MLA pool, with DeepSeek's decoupled rope.

Per token the cache holds one "head": [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim)], where
c_kv = kv_a_layernorm(latent) and k_rope is already rotated. Attention runs in the latent space
(the "absorbed" form): kv_b_proj = [W_uk; W_uv] per head, so
  q_nope . (W_uk c) == (W_uk^T q_nope) . c        scores read c directly
  sum_j p_j (W_uv c_j) == W_uv (sum_j p_j c_j)    values are c, projected once after the softmax
which is multi-query attention with head dim kv_lora_rank + qk_rope_head_dim and value dim
kv_lora_rank. Heads are independent, so a tensor-parallel rank holds a slice of them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.config import MLAConfig, ModelConfig, RopeScaling
from services.scheduler.model.layers import RMSNorm, Rotary, on_default_device
from services.scheduler.model.parallel import Linears


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(s: RopeScaling | None) -> float:
    """What cos/sin are multiplied by (transformers' rule: mscale ratio if both are given)."""
    if s is None or s.rope_type != "yarn":
        return 1.0
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def yarn_softmax_scale(qk_head_dim: int, s: RopeScaling | None) -> float:
    """DeepSeek's softmax scale: qk_head_dim**-0.5, times yarn_mscale(factor, mscale_all_dim)**2."""
    scale = qk_head_dim**-0.5
    if s is not None and s.rope_type == "yarn" and s.mscale_all_dim:
        scale *= yarn_mscale(s.factor, s.mscale_all_dim) ** 2
    return scale


def deepseek_inv_freq(dim: int, theta: float, s: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [dim // 2] (float32); YaRN blends interpolated (low-frequency) and
    extrapolated (high-frequency) bands with a linear ramp between the correction dims. Computed on
    the CPU and moved to the default device (see layers.on_default_device)."""
    return on_default_device(_deepseek_inv_freq(dim, theta, s))


def _deepseek_inv_freq(dim: int, theta: float, s: RopeScaling | None) -> torch.Tensor:
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    extrapolated = 1.0 / pos_freqs
    if s is None:
        return extrapolated
    if s.rope_type != "yarn":
        raise ValueError(f"DeepSeek models support rope types default and yarn, not {s.rope_type!r}")
    interpolated = 1.0 / (s.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(theta))
        )

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the original frequency), 0: interpolate
    return interpolated * (1 - keep) + extrapolated * keep


class DeepseekRotary(Rotary):
    """Rope on the qk_rope_head_dim part of q and k. Interleaved (DeepSeek's complex-pair form):
    pairs (2i, 2i+1) rotate by angle i. The torch path writes the result de-interleaved
    ([evens | odds]), the Triton kernel in place; q and k always share a layout, so every q.k
    product (and so the model) is the same on both."""

    def __init__(self, dim: int, theta: float, scaling: RopeScaling | None, interleave: bool) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling, self.interleave = dim, theta, scaling, interleave
        self.attention_factor = yarn_attention_factor(scaling)
        self.register_buffer("inv_freq", deepseek_inv_freq(dim, theta, scaling), persistent=False)

    def init_buffers(self, device: torch.device | str) -> None:
        self.inv_freq = deepseek_inv_freq(self.dim, self.theta, self.scaling).to(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, dim], k: [T, 1, dim]; angles in float32 from integer positions.
        if self._kernel is not None:
            q, k = self._kernel(positions, q, k, self.inv_freq, is_neox=not self.interleave)
            if self.attention_factor != 1.0:  # rotation is linear: scaling cos/sin scales the result
                q, k = q * self.attention_factor, k * self.attention_factor
            return q, k
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, dim/2]
        cos = (freqs.cos() * self.attention_factor)[:, None, :]
        sin = (freqs.sin() * self.attention_factor)[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x[..., : self.dim // 2], x[..., self.dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MLABackend(Protocol):
    def forward(
        self,
        q_latent: torch.Tensor,  # [T, H, kv_lora_rank]: q_nope absorbed through W_UK
        q_rope: torch.Tensor,  # [T, H, rope]
        cache: torch.Tensor,  # [size, 1, kv_lora_rank + rope]: this layer's latent pool
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor: ...  # [T, H, kv_lora_rank]


class TorchMLABackend:
    """Latent attention in torch: SDPA per request (`latent_attention`)."""

    def forward(
        self, q_latent: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, batch: ForwardBatch, scale: float
    ) -> torch.Tensor:
        q = torch.cat([q_latent, q_rope], dim=-1)
        return latent_attention(q, cache, batch, q_latent.shape[-1], scale)


class MLAAttention(nn.Module):
    """Parameter names equal Hugging Face's DeepseekV2/V3Attention. `num_heads` may be a
    tensor-parallel slice of the config's heads; `linears` builds the projections (plain or
    parallel: q/kv_b column-split by head, o row-split)."""

    def __init__(self, config: ModelConfig, layer_id: int, linears: Linears | None = None) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None
        self.mla: MLAConfig = mla
        self.layer_id = layer_id
        lin = linears or Linears()
        hidden, bias = config.hidden_size, config.attention_bias
        self.num_heads = config.num_attention_heads // lin.tp_size
        q_out = config.num_attention_heads * mla.qk_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = lin.column(hidden, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = lin.column(mla.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.kv_cache_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, config.rms_norm_eps)
        kv_b_out = config.num_attention_heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        self.kv_b_proj = lin.column(mla.kv_lora_rank, kv_b_out, bias=False)
        self.o_proj = lin.row(config.num_attention_heads * mla.v_head_dim, hidden, bias=bias)
        self.scale = yarn_softmax_scale(mla.qk_head_dim, config.rope_scaling)

    def forward(
        self, x: torch.Tensor, batch: ForwardBatch, rotary: DeepseekRotary, backend: MLABackend
    ) -> torch.Tensor:
        m, t, h = self.mla, x.shape[0], self.num_heads
        if t == 0:  # an idle batch (DP attention): no rows, and o_proj's collective is skipped
            return torch.zeros_like(x)
        if m.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, h, m.qk_head_dim)
        q_nope, q_rope = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)

        latent, k_rope = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope, k_rope = rotary(batch.positions, q_rope, k_rope[:, None, :])  # k_rope: [T, 1, rope]

        cache = batch.kv_pool.kv[self.layer_id]  # type: ignore[attr-defined]  # MLAKVPool: [size, 1, D]
        cache[batch.out_cache_loc] = torch.cat([latent[:, None, :], k_rope], dim=-1).to(cache.dtype)

        w = self.kv_b_proj.weight.view(h, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk, w_uv = w[:, : m.qk_nope_head_dim], w[:, m.qk_nope_head_dim :]
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)
        o_latent = backend.forward(q_latent, q_rope, cache, batch, self.scale)  # [T, H, kv_lora]
        o = torch.einsum("thc,hvc->thv", o_latent, w_uv).reshape(t, h * m.v_head_dim)
        return self.o_proj(o)


def latent_attention(
    q: torch.Tensor,  # [T, H, D], D = kv_lora_rank + rope
    cache: torch.Tensor,  # [size, 1, D]
    batch: ForwardBatch,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:  # [T, H, kv_lora_rank]
    """Causal MQA per request: keys are the cached rows, values their first kv_lora_rank values."""
    h = q.shape[1]
    out = q.new_empty(q.shape[0], h, kv_lora_rank)
    start = 0
    for extend_len, seq_len, idx in zip(batch.extend_lens, batch.seq_lens, batch.kv_indices, strict=True):
        prefix_len = seq_len - extend_len
        qi = q[start : start + extend_len].transpose(0, 1)  # [H, e, D]
        kv = cache[idx, 0].to(q.dtype)  # [s, D]
        ki = kv[None].expand(h, -1, -1)
        vi = kv[None, :, :kv_lora_rank].expand(h, -1, -1)
        mask = None
        if extend_len > 1:
            # query j sits at absolute position prefix_len + j and sees keys 0..prefix_len + j.
            qpos = torch.arange(prefix_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
        out[start : start + extend_len] = oi.transpose(0, 1)
        start += extend_len
    return out
