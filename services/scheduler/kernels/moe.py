"""Routed experts as sort-by-expert + one grouped GEMM launch per projection (fused-MoE style).

Inputs: x [T, hidden], the router's choice topk_ids [T, K] / topk_weights [T, K], and all experts'
weights stacked: w13 [E, 2 * inter, hidden] (gate rows then up rows), w2 [E, hidden, inter].
  out[t] = sum_k topk_weights[t, k] * W2[e] (silu(G[e] x[t]) * U[e] x[t]),  e = topk_ids[t, k]

`moe_align` lists the T*K (token, slot) pairs grouped by expert, each expert's run padded to a
multiple of BLOCK_M with the sentinel T*K, so every BLOCK_M rows of the list belong to one expert
(block_expert[j], or -1 for the unused tail). It runs on the device with no host sync: the list is
sized for the worst case, T*K + E*(BLOCK_M - 1). The grouped GEMM then gives each program one
block of rows and one BLOCK_N slice of the output and multiplies by that block's expert only.

Error bounds against `fused_moe_ref` (max abs error / max abs reference):
  float32 under TRITON_INTERPRET=1: 1e-5;  float32 on GPU (tf32 dots): 5e-3;
  float16 on GPU: 1e-2;  bfloat16 on GPU: 3e-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MOE_RTOL = {"interpret_float32": 1e-5, "float32": 5e-3, "float16": 1e-2, "bfloat16": 3e-2}


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids int32 [P], block_expert int32 [P // block_m]); see the module docstring."""
    flat = topk_ids.flatten().to(torch.int64)
    n = flat.numel()
    dev = flat.device
    size = n + num_experts * (block_m - 1)
    size = (size + block_m - 1) // block_m * block_m
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert_of]
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=dev)
    sorted_ids[(padded_end - padded)[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, size, block_m, device=dev)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _moe_grouped_gemm(
    A, W, Out, sorted_ids, block_expert, topk_weights,
    num_pairs, N, K, a_rows_per_pair,
    stride_am, stride_we, stride_wn, stride_om,
    MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Out[pair, n] = A[pair // a_rows_per_pair] . W[expert, n, :] (times the pair's routing weight).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert + pid_m).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pair < num_pairs
    a_row = (pair // a_rows_per_pair).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        a = tl.load(A + a_row[:, None] * stride_am + (k0 + offs_k)[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(W + expert * stride_we + offs_n[None, :] * stride_wn + (k0 + offs_k)[:, None],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a, w).to(tl.float32)
    if MUL_WEIGHT:
        acc = acc * tl.load(topk_weights + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(Out + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


def _grouped_gemm(
    a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
    topk_weights: torch.Tensor | None, a_rows_per_pair: int, block_m: int,
) -> None:
    n, k = w.shape[1], w.shape[2]
    if a.stride(1) != 1 or w.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("moe operands must be contiguous in their last dimension")
    block_n = 64 if n >= 64 else 32
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    weights = topk_weights if topk_weights is not None else out  # unused pointer when not MUL_WEIGHT
    _moe_grouped_gemm[grid](
        a, w, out, sorted_ids, block_expert, weights,
        out.shape[0], n, k, a_rows_per_pair,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        MUL_WEIGHT=topk_weights is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32,
    )


def fused_moe(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * inter, hidden]
    w2: torch.Tensor,  # [E, hidden, inter]
    topk_weights: torch.Tensor,  # [T, K]
    topk_ids: torch.Tensor,  # [T, K], global expert ids
    block_m: int = 16,
    expert_start: int = 0,  # w13[i] / w2[i] is global expert expert_start + i (an EP rank's slice)
) -> torch.Tensor:  # [T, hidden]
    """Experts outside [expert_start, expert_start + E) contribute nothing (another EP rank's)."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, two_inter = w13.shape[0], w13.shape[1]
    if w13.shape[2] != hidden or w2.shape[0] != num_experts or w2.shape[1] != hidden or 2 * w2.shape[2] != two_inter:
        raise ValueError(f"moe weight shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    local = topk_ids.to(torch.int64) - expert_start
    foreign = (local < 0) | (local >= num_experts)
    # Foreign pairs go to a phantom expert E whose blocks moe_align marks -1 (skipped): their rows of
    # `down` stay zero, so the sum over K leaves them out.
    sorted_ids, block_expert = moe_align(local.masked_fill(foreign, num_experts), num_experts + 1, block_m)
    block_expert = block_expert.masked_fill(block_expert == num_experts, -1)
    num_pairs = num_tokens * top_k
    gate_up = x.new_empty(num_pairs, two_inter)
    _grouped_gemm(x, w13, gate_up, sorted_ids, block_expert, None, top_k, block_m)
    gate, up = gate_up.chunk(2, dim=-1)
    act = (F.silu(gate.float()) * up.float()).to(x.dtype)  # [T*K, inter]
    down = x.new_zeros(num_pairs, hidden)  # no host sync to ask whether any pair is foreign
    weights = topk_weights.reshape(-1).contiguous().to(torch.float32)
    _grouped_gemm(act, w2, down, sorted_ids, block_expert, weights, 1, block_m)
    return down.view(num_tokens, top_k, hidden).float().sum(1).to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
) -> torch.Tensor:
    """The same contract in torch, float32 math, one expert at a time."""
    inter = w2.shape[2]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = (topk_ids == expert_start + e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok].float() @ w13[e].float().T
        h = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, (h @ w2[e].float().T) * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
