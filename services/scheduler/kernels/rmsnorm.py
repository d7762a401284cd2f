"""Fused residual add + RMSNorm: one program per row, the row held in registers.

  residual_out = x + residual            (rounded to x's dtype, as the unfused model does)
  out = weight * (residual_out * rsqrt(mean(residual_out^2) + eps))   (statistic in float32)
Without a residual it is plain RMSNorm and residual_out is x itself. Matches
model.layers.RMSNorm, which casts the normalised row to the activation dtype before the weight.

Error bounds against `fused_add_rmsnorm_ref` (max abs error / max abs reference):
  float32 under TRITON_INTERPRET=1 and on GPU: 1e-5;  float16 on GPU: 2e-3;  bfloat16 on GPU: 1.6e-2
  (one rounding step of the output dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.scheduler.kernels.paged import next_pow2

RMSNORM_RTOL = {"interpret_float32": 1e-5, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@triton.jit
def _fused_add_rmsnorm(
    X, Res, W, Out, ResOut, eps, n_cols,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(Res + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
        x = x.to(Out.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(Out.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (normed * w).to(Out.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(
    x: torch.Tensor,  # [T, D]
    weight: torch.Tensor,  # [D]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, D]
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual); the new residual is x + residual, or x when residual is None."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("fused_add_rmsnorm takes a [T, D] tensor with contiguous rows")
    rows, cols = x.shape
    out = torch.empty_like(x) if out is None else out
    if residual is None:
        residual_out = x
    elif residual_out is None:
        residual_out = torch.empty_like(x)
    if rows == 0:
        return out, residual_out
    res = residual if residual is not None else x
    _fused_add_rmsnorm[(rows,)](
        x, res, weight, out, residual_out, eps, cols,
        x.stride(0), res.stride(0), out.stride(0), residual_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=next_pow2(cols),
    )
    return out, residual_out


def fused_add_rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused torch path: add in x's dtype, then model.layers.RMSNorm's arithmetic."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * normed.float()).to(x.dtype), x
