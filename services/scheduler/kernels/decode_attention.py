"""Paged decode attention for GQA: one query token per request, keys/values read from the KV pool.

Split-K ("flash decoding") in two launches:
  stage 1, grid (batch, kv_head, split): each program takes one request's query heads that share
    a kv head (padded to BLOCK_H rows so the score is a tl.dot) and a 1/num_splits share of its
    keys; it writes the share's normalised partial output and log-sum-exp (lse = -inf when the
    share is empty, e.g. a sequence shorter than num_splits).
  stage 2, grid (batch, head): merges the splits, weighting each by exp(lse - max lse).
Query head h reads kv head h // (num_heads // num_kv_heads), as HF's repeat_kv does.

Error bounds against `decode_attention_ref` (max abs error / max abs reference):
  float32 under TRITON_INTERPRET=1: 1e-5;  float32 on GPU (tl.dot uses tf32): 5e-3;
  float16 on GPU: 5e-3;  bfloat16 on GPU: 2e-2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.scheduler.kernels.paged import next_pow2

# Relative error bounds per dtype, as stated above (used by the tests and the benchmark).
DECODE_RTOL = {"interpret_float32": 1e-5, "float32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}


@triton.jit
def _decode_stage1(
    Q, K, V, kv_indptr, kv_indices, MidO, MidLse,
    sm_scale, num_splits,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    kv_start = tl.load(kv_indptr + b)
    seq_len = tl.load(kv_indptr + b + 1) - kv_start
    per_split = tl.cdiv(seq_len, num_splits)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq_len)

    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        slot = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(
            K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        )
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # Every block holds >= 1 live key (n0 < hi), so m_new is finite and exp() never sees inf - inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(
            V + slot[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
            mask=n_mask[:, None] & dv_mask[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    # MidO is [B, H, num_splits, BLOCK_DV] and MidLse [B, H, num_splits], both contiguous float32.
    row = (b * num_heads + heads) * num_splits + split
    tl.store(MidO + row[:, None] * BLOCK_DV + offs_dv[None, :], out, mask=h_mask[:, None])
    tl.store(MidLse + row, lse, mask=h_mask)


@triton.jit
def _merge_splits(
    MidO, MidLse, Out, num_splits, stride_ob, stride_oh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < num_splits
    row = (b * num_heads + h) * num_splits + offs_s
    lse = tl.load(MidLse + row, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: weights are 0 and the output is 0
    w = tl.exp(lse - m)
    denom = tl.sum(w, 0)
    part = tl.load(MidO + row[:, None] * BLOCK_DV + offs_dv[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_dv, out.to(Out.dtype.element_ty), mask=offs_dv < DV)


def merge_splits(mid_o: torch.Tensor, mid_lse: torch.Tensor, out: torch.Tensor) -> None:
    """out[b, h] = sum_s softmax_s(mid_lse[b, h, :]) * mid_o[b, h, s, :DV] (also used by mla_decode)."""
    batch, heads, num_splits, block_dv = mid_o.shape
    _merge_splits[(batch, heads)](
        mid_o, mid_lse, out, num_splits, out.stride(0), out.stride(1),
        DV=out.shape[2], BLOCK_DV=block_dv, BLOCK_S=next_pow2(max(num_splits, 2)),
    )


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [S, KVH, D]
    v_cache: torch.Tensor,  # [S, KVH, DV]
    kv_indptr: torch.Tensor,  # int32 [B + 1]
    kv_indices: torch.Tensor,  # int64 [kv_indptr[-1]]
    sm_scale: float,
    num_kv_splits: int = 8,
    out: torch.Tensor | None = None,  # [B, H, DV]
) -> torch.Tensor:
    """softmax(q k^T * sm_scale) v per request over its paged keys; every request needs >= 1 key."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, dv = k_cache.shape[1], v_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if out is None:
        out = q.new_empty(batch, num_heads, dv)
    if batch == 0:
        return out
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("the head dimension of q, k_cache and v_cache must be contiguous")
    group = num_heads // num_kv_heads
    block_dv = next_pow2(max(dv, 16))
    mid_o = torch.empty(batch, num_heads, num_kv_splits, block_dv, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
    _decode_stage1[(batch, num_kv_heads, num_kv_splits)](
        q, k_cache, v_cache, kv_indptr, kv_indices, mid_o, mid_lse,
        sm_scale, num_kv_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        GROUP=group, D=head_dim, DV=dv,
        BLOCK_H=next_pow2(max(group, 16)), BLOCK_D=next_pow2(max(head_dim, 16)), BLOCK_DV=block_dv,
        BLOCK_N=32,
    )
    merge_splits(mid_o, mid_lse, out)
    return out


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The same contract in torch, float32 math, one request at a time."""
    batch, num_heads, _ = q.shape
    group = num_heads // k_cache.shape[1]
    out = q.new_empty(batch, num_heads, v_cache.shape[2])
    ptr = kv_indptr.tolist()
    for b in range(batch):
        idx = kv_indices[ptr[b] : ptr[b + 1]]
        k = k_cache[idx].float().repeat_interleave(group, dim=1)  # [s, H, D]
        v = v_cache[idx].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,shd->hs", q[b].float(), k) * sm_scale
        out[b] = torch.einsum("hs,shd->hd", scores.softmax(-1), v).to(out.dtype)
    return out
