"""MLA decode in the absorbed form, over the latent cache (DeepSeek-V2/V3).

The cache holds, per token per layer, one vector [c_kv (kv_lora_rank) | k_rope (rope_dim)] shared by
all heads. With W_UK absorbed into the query (q_latent = q_nope @ W_UK, per head) the score is
  s[h, t] = (q_latent[h] . c_kv[t] + q_rope[h] . k_rope[t]) * sm_scale
and the values are c_kv itself, so the output stays in latent space: o[h] = softmax(s[h]) @ c_kv,
which the caller projects through W_UV. The kernel knows nothing of W_UK / W_UV.

Same split-K scheme as decode_attention (stage 1 here, stage 2 is its `merge_splits`), but the
score is two tl.dots (latent block + rope block, so 512 + 64 is not padded to 1024) and each
latent block is loaded once and used as both key and value.

Error bounds against `mla_decode_ref` (max abs error / max abs reference):
  float32 under TRITON_INTERPRET=1: 1e-5;  float32 on GPU (tf32 dots): 5e-3;
  float16 on GPU: 5e-3;  bfloat16 on GPU: 2e-2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.scheduler.kernels.decode_attention import merge_splits
from services.scheduler.kernels.paged import next_pow2

MLA_DECODE_RTOL = {"interpret_float32": 1e-5, "float32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}


@triton.jit
def _mla_decode_stage1(
    QL, QR, Cache, kv_indptr, kv_indices, MidO, MidLse,
    sm_scale, num_splits, num_heads,
    stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_ct,
    C: tl.constexpr, R: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    hblk = tl.program_id(1)
    split = tl.program_id(2)

    heads = hblk * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < num_heads
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_mask = offs_c < C
    r_mask = offs_r < R

    kv_start = tl.load(kv_indptr + b)
    seq_len = tl.load(kv_indptr + b + 1) - kv_start
    per_split = tl.cdiv(seq_len, num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    ql = tl.load(QL + b * stride_qlb + heads[:, None] * stride_qlh + offs_c[None, :],
                 mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    qr = tl.load(QR + b * stride_qrb + heads[:, None] * stride_qrh + offs_r[None, :],
                 mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        slot = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        latent = tl.load(Cache + slot[:, None] * stride_ct + offs_c[None, :],
                         mask=n_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
        rope = tl.load(Cache + slot[:, None] * stride_ct + C + offs_r[None, :],
                       mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        s = tl.dot(ql, tl.trans(latent)).to(tl.float32) + tl.dot(qr, tl.trans(rope)).to(tl.float32)
        s = tl.where(n_mask[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: the block holds >= 1 live key
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * num_heads + heads) * num_splits + split
    tl.store(MidO + row[:, None] * BLOCK_C + offs_c[None, :], out, mask=h_mask[:, None])
    tl.store(MidLse + row, lse, mask=h_mask)


def mla_decode(
    q_latent: torch.Tensor,  # [B, H, C]: q_nope absorbed through W_UK
    q_rope: torch.Tensor,  # [B, H, R]: the rotated rope part of the query
    latent_cache: torch.Tensor,  # [S, C + R] (or [S, 1, C + R]): c_kv | k_rope per slot
    kv_indptr: torch.Tensor,  # int32 [B + 1]
    kv_indices: torch.Tensor,  # int64 [kv_indptr[-1]]
    sm_scale: float,
    num_kv_splits: int = 8,
    out: torch.Tensor | None = None,  # [B, H, C]
) -> torch.Tensor:
    """Latent-space attention output [B, H, C]; every request needs >= 1 key."""
    if latent_cache.dim() == 3:
        latent_cache = latent_cache.squeeze(1)
    batch, num_heads, c = q_latent.shape
    r = q_rope.shape[2]
    if latent_cache.shape[1] != c + r:
        raise ValueError(f"latent cache width {latent_cache.shape[1]} != kv_lora_rank {c} + rope {r}")
    if out is None:
        out = q_latent.new_empty(batch, num_heads, c)
    if batch == 0:
        return out
    if q_latent.stride(2) != 1 or q_rope.stride(2) != 1 or latent_cache.stride(1) != 1:
        raise ValueError("the last dimension of q_latent, q_rope and latent_cache must be contiguous")
    block_h = 16
    block_c = next_pow2(max(c, 16))
    mid_o = torch.empty(batch, num_heads, num_kv_splits, block_c, dtype=torch.float32, device=q_latent.device)
    mid_lse = torch.empty(batch, num_heads, num_kv_splits, dtype=torch.float32, device=q_latent.device)
    grid = (batch, triton.cdiv(num_heads, block_h), num_kv_splits)
    _mla_decode_stage1[grid](
        q_latent, q_rope, latent_cache, kv_indptr, kv_indices, mid_o, mid_lse,
        sm_scale, num_kv_splits, num_heads,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1), latent_cache.stride(0),
        C=c, R=r, BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_R=next_pow2(max(r, 16)), BLOCK_N=16,
    )
    merge_splits(mid_o, mid_lse, out)
    return out


def mla_decode_ref(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The same contract in torch, float32 math, one request at a time."""
    if latent_cache.dim() == 3:
        latent_cache = latent_cache.squeeze(1)
    c = q_latent.shape[2]
    out = q_latent.new_empty(q_latent.shape)
    ptr = kv_indptr.tolist()
    for b in range(q_latent.shape[0]):
        rows = latent_cache[kv_indices[ptr[b] : ptr[b + 1]]].float()  # [s, C + R]
        latent, rope = rows[:, :c], rows[:, c:]
        scores = (q_latent[b].float() @ latent.T + q_rope[b].float() @ rope.T) * sm_scale  # [H, s]
        out[b] = (scores.softmax(-1) @ latent).to(out.dtype)
    return out


def mla_decode_unabsorbed_ref(
    q_nope: torch.Tensor,  # [B, H, P]
    q_rope: torch.Tensor,  # [B, H, R]
    latent_cache: torch.Tensor,  # [S, C + R]
    w_uk: torch.Tensor,  # [H, P, C]: k_nope[h] = W_UK[h] @ c_kv
    w_uv: torch.Tensor,  # [H, V, C]: v[h] = W_UV[h] @ c_kv
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """MLA as written in the paper (decompress K and V per head, then plain attention): [B, H, V].
    Used to check that absorbing W_UK into q and W_UV after the kernel gives the same answer."""
    c = latent_cache.shape[-1] - q_rope.shape[2]
    cache = latent_cache.reshape(latent_cache.shape[0], -1).float()
    out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1])
    ptr = kv_indptr.tolist()
    for b in range(q_nope.shape[0]):
        rows = cache[kv_indices[ptr[b] : ptr[b + 1]]]
        latent, rope = rows[:, :c], rows[:, c:]
        k_nope = torch.einsum("hpc,sc->hsp", w_uk.float(), latent)
        v = torch.einsum("hvc,sc->hsv", w_uv.float(), latent)
        scores = torch.einsum("hp,hsp->hs", q_nope[b].float(), k_nope) + q_rope[b].float() @ rope.T
        out[b] = torch.einsum("hs,hsv->hv", (scores * sm_scale).softmax(-1), v).to(out.dtype)
    return out
