"""Extend (prefill with a cached prefix) attention over paged KV, causal, GQA.

Request i has e_i new query tokens (rows qo_indptr[i]:qo_indptr[i+1] of q) and s_i keys in the pool
(kv_indptr CSR), the last e_i of which are the new tokens' own K/V, already written by the caller.
Query j of request i sits at absolute position p_i + j with p_i = s_i - e_i (the cached prefix) and
sees keys 0 .. p_i + j. A decode request is the case e_i = 1, so a mixed batch is one launch.

Grid (request, head, query block of BLOCK_M rows); each program streams keys 0 .. p_i + last row
from the pool in BLOCK_N blocks with an online softmax. Key 0 is visible to every query, so the
first block makes every live row's running max finite.

Error bounds against `extend_attention_ref` (max abs error / max abs reference):
  float32 under TRITON_INTERPRET=1: 1e-5;  float32 on GPU (tf32 dots): 5e-3;
  float16 on GPU: 5e-3;  bfloat16 on GPU: 2e-2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.scheduler.kernels.paged import next_pow2

EXTEND_RTOL = {"interpret_float32": 1e-5, "float32": 5e-3, "float16": 5e-3, "bfloat16": 2e-2}


@triton.jit
def _extend_attention(
    Q, K, V, Out, qo_indptr, kv_indptr, kv_indices, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mblk = tl.program_id(2)
    kvh = h // GROUP

    q_start = tl.load(qo_indptr + b)
    ext = tl.load(qo_indptr + b + 1) - q_start
    kv_start = tl.load(kv_indptr + b)
    seq_len = tl.load(kv_indptr + b + 1) - kv_start
    prefix = seq_len - ext

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < ext
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV

    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    # The last live row of this block sees keys < prefix + its index + 1; an empty block sees none.
    hi = tl.minimum(seq_len, prefix + (mblk + 1) * BLOCK_M)
    hi = tl.where(mblk * BLOCK_M < ext, hi, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        slot = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * sm_scale  # [BLOCK_M, BLOCK_N]
        visible = n_mask[None, :] & (offs_n[None, :] <= prefix + offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])


def extend_attention(
    q: torch.Tensor,  # [T, H, D]: all requests' new tokens, request-major
    k_cache: torch.Tensor,  # [S, KVH, D]
    v_cache: torch.Tensor,  # [S, KVH, DV]
    qo_indptr: torch.Tensor,  # int32 [B + 1]
    kv_indptr: torch.Tensor,  # int32 [B + 1]
    kv_indices: torch.Tensor,  # int64 [kv_indptr[-1]]
    max_extend_len: int,  # max over requests of e_i (a host int, so the grid needs no sync)
    sm_scale: float,
    out: torch.Tensor | None = None,  # [T, H, DV]
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, dv = k_cache.shape[1], v_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if out is None:
        out = q.new_empty(num_tokens, num_heads, dv)
    batch = qo_indptr.numel() - 1
    if batch == 0 or num_tokens == 0:
        return out
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("the head dimension of q, k_cache, v_cache and out must be contiguous")
    block_m = 32 if max_extend_len > 16 else 16
    grid = (batch, num_heads, triton.cdiv(max_extend_len, block_m))
    _extend_attention[grid](
        q, k_cache, v_cache, out, qo_indptr, kv_indptr, kv_indices, sm_scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        GROUP=num_heads // num_kv_heads, D=head_dim, DV=dv,
        BLOCK_M=block_m, BLOCK_N=32, BLOCK_D=next_pow2(max(head_dim, 16)), BLOCK_DV=next_pow2(max(dv, 16)),
    )
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """The same contract in torch, float32 math, one request at a time."""
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[1]
    out = q.new_empty(q.shape[0], num_heads, v_cache.shape[2])
    qp, kp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qp) - 1):
        e, s = qp[b + 1] - qp[b], kp[b + 1] - kp[b]
        idx = kv_indices[kp[b] : kp[b + 1]]
        k = k_cache[idx].float().repeat_interleave(group, dim=1)  # [s, H, D]
        v = v_cache[idx].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q[qp[b] : qp[b + 1]].float(), k) * sm_scale
        visible = torch.arange(s)[None, :] <= (s - e + torch.arange(e))[:, None]  # [e, s]
        scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
        out[qp[b] : qp[b + 1]] = torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(out.dtype)
    return out
