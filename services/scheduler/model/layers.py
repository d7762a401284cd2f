"""Building blocks shared by the decoder models: RMSNorm and rotary embedding (`Rotary`, which
mla.py's DeepseekRotary also extends).

RMSNorm and RotaryEmbedding compute in torch unless `use_triton()` switched them to their Triton
kernels (services/scheduler/kernels; `--attention-backend triton`, the default on CUDA): the same
contract either way, each kernel checked against the torch code here by tests/unit/test_kernels_*.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn

from services.scheduler.model.config import RopeScaling


class RMSNorm(nn.Module):
    """`norm(x)`, or with a residual `norm(x, residual)` -> (norm(x + residual), x + residual): the
    decoder layers pass the residual stream along so that the add fuses into the norm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self._fused: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def use_triton(self) -> None:
        from services.scheduler.kernels.rmsnorm import fused_add_rmsnorm

        self._fused = fused_add_rmsnorm

    @overload
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...
    @overload
    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._fused is not None and x.dim() == 2 and x.stride(-1) == 1:
            normed, summed = self._fused(x, self.weight, self.eps, residual)
            return normed if residual is None else (normed, summed)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel, the same math
        # The statistic is taken in float32 whatever the activation dtype.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32), with linear or llama3 scaling applied.
    Computed on the CPU and moved to the default device (see on_default_device)."""
    return on_default_device(_rope_inv_freq(head_dim, theta, scaling))


def on_default_device(cpu: torch.Tensor) -> torch.Tensor:
    """A buffer computed on the CPU, moved to the default device. The loader builds models under
    `torch.device("meta")`, where arithmetic runs torch's Python meta kernels, whose first use
    imports torch._dynamo and sympy (seconds of every scheduler's start); the loader recomputes
    these buffers on the real device anyway."""
    return cpu.to(torch.get_default_device())


def _rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    arange = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu")
    inv_freq = 1.0 / (theta ** (arange.float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Wavelengths longer than the original context / low_freq_factor are stretched by `factor`,
        # those shorter than context / high_freq_factor are kept, and the band between is blended.
        old_ctx = scaling.original_max_position_embeddings
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / scaling.factor, inv_freq)
        t = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - t) * scaled / scaling.factor + t * scaled
        mid_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(mid_band, blended, scaled)
    raise ValueError(f"unsupported rope type {scaling.rope_type!r}")


class Rotary(nn.Module):
    """What the rotary modules share: `forward(positions, q, k) -> (q, k)`, and `use_triton()`,
    which hands them the Triton rotary kernel (`_kernel`) to use instead of their torch code."""

    def __init__(self) -> None:
        super().__init__()
        self._kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    def use_triton(self) -> None:
        from services.scheduler.kernels.rotary import rotary_embedding

        self._kernel = rotary_embedding

    @property
    def uses_torch(self) -> bool:
        return self._kernel is None


class RotaryEmbedding(Rotary):
    """Rotate-half RoPE (the GPT-NeoX / HF Llama layout: pairs are (i, i + head_dim/2))."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (positions, cos, sin)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # q: [T, H, D], k: [T, KVH, D]; angles are computed in float32 from integer positions.
        if self._kernel is not None:
            return self._kernel(positions, q, k, self.inv_freq, is_neox=True)
        return self.rotate(positions, q), self.rotate(positions, k)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by each row's position in torch, any number of heads (q and k
        may come as one tensor)."""
        if self._cached is None or self._cached[0] is not positions or self._cached[1].dtype != x.dtype:
            # every layer of a step rotates by the same positions: the angles are computed once
            freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
            emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]  # [T, 1, D]
            self._cached = (positions, emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        _, cos, sin = self._cached
        return _rotate(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos + rotated * sin
