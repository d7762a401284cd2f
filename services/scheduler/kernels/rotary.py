"""Rotary embedding applied to q and k in one launch, angles computed in float32 from positions.

For each token t and rotated pair (a, b) of dimension i < rot_dim / 2, with
angle = positions[t] * inv_freq[i]:  a' = a cos - b sin,  b' = b cos + a sin.
Pairs are (i, i + rot_dim/2) in the NeoX / HF-Llama layout (is_neox=True) and (2i, 2i+1) in the
GPT-J layout used for DeepSeek's rope part (is_neox=False). Dimensions >= rot_dim pass through.
Grid (token,); each program rotates all heads of q and of k for its token. In place when the
outputs are the inputs (every element is read before it is written, by the same program).

Error bounds against `rotary_ref` (max abs error / max abs reference):
  float32 under TRITON_INTERPRET=1 and on GPU: 1e-5;  float16 on GPU: 2e-3;  bfloat16 on GPU: 1.6e-2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.scheduler.kernels.paged import next_pow2

ROTARY_RTOL = {"interpret_float32": 1e-5, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@triton.jit
def _rotate_heads(X, Y, t, stride_xt, stride_xh, stride_yt, stride_yh, num_heads, cos, sin,
                  HALF: tl.constexpr, IS_NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    offs_h = tl.arange(0, BLOCK_H)
    offs_i = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < num_heads)[:, None] & (offs_i < HALF)[None, :]
    if IS_NEOX:
        d1 = offs_i
        d2 = offs_i + HALF
    else:
        d1 = 2 * offs_i
        d2 = 2 * offs_i + 1
    base_x = X + t * stride_xt + offs_h[:, None] * stride_xh
    base_y = Y + t * stride_yt + offs_h[:, None] * stride_yh
    a = tl.load(base_x + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(base_x + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(base_y + d1[None, :], (a * cos - b * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(base_y + d2[None, :], (b * cos + a * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary(
    Pos, InvFreq, Q, K, QOut, KOut, num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
    HALF: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    pos = tl.load(Pos + t).to(tl.float32)
    angle = pos * tl.load(InvFreq + offs_i, mask=offs_i < HALF, other=0.0).to(tl.float32)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]
    _rotate_heads(Q, QOut, t, stride_qt, stride_qh, stride_qot, stride_qoh, num_q_heads, cos, sin,
                  HALF, IS_NEOX, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KOut, t, stride_kt, stride_kh, stride_kot, stride_koh, num_k_heads, cos, sin,
                  HALF, IS_NEOX, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(
    positions: torch.Tensor,  # [T] integer positions
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    inv_freq: torch.Tensor,  # [rot_dim / 2], rot_dim <= D
    is_neox: bool = True,
    q_out: torch.Tensor | None = None,  # pass q (and k) to rotate in place
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    half = inv_freq.numel()
    head_dim = q.shape[2]
    if 2 * half > head_dim or k.shape[2] != head_dim:
        raise ValueError(f"rotary dim {2 * half} does not fit head dims q {head_dim}, k {k.shape[2]}")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("the head dimension of q and k must be contiguous")
    q_out = torch.empty_like(q) if q_out is None else q_out
    k_out = torch.empty_like(k) if k_out is None else k_out
    for src, dst in ((q, q_out), (k, k_out)):
        if dst is not src and 2 * half < head_dim:
            dst[..., 2 * half :] = src[..., 2 * half :]
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return q_out, k_out
    _rotary[(num_tokens,)](
        positions, inv_freq, q, k, q_out, k_out, q.shape[1], k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        HALF=half, IS_NEOX=is_neox,
        BLOCK_HQ=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(k.shape[1]), BLOCK_HALF=next_pow2(half),
    )
    return q_out, k_out


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, inv_freq: torch.Tensor, is_neox: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same contract in torch, float32 math."""
    half = inv_freq.numel()
    angle = positions.float()[:, None] * inv_freq.float()[None, :]  # [T, half]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        y = x.float().clone()
        if is_neox:
            a, b = y[..., :half].clone(), y[..., half : 2 * half].clone()
            y[..., :half], y[..., half : 2 * half] = a * cos - b * sin, b * cos + a * sin
        else:
            a, b = y[..., 0 : 2 * half : 2].clone(), y[..., 1 : 2 * half : 2].clone()
            y[..., 0 : 2 * half : 2], y[..., 1 : 2 * half : 2] = a * cos - b * sin, b * cos + a * sin
        return y.to(x.dtype)

    return rotate(q), rotate(k)
