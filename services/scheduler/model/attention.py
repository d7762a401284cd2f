"""Attention over the KV pool, in plain torch (one SDPA call per request).

The backend is the only code that touches the pool's K/V tensors: it writes the step's new K/V
at out_cache_loc, then reads each request's whole sequence back through kv_indices. A faster
backend (Triton, FlashInfer) replaces this class and keeps its `forward` signature.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from services.scheduler.model.batch import ForwardBatch


class AttentionBackend(Protocol):
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        batch: ForwardBatch,
        scale: float | None = None,
    ) -> torch.Tensor: ...  # [T, num_heads, head_dim]


def store_kv(layer_id: int, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Writes the step's new K/V at `out_cache_loc`; returns the layer's (K, V) caches."""
    pool = batch.kv_pool
    k_cache, v_cache = pool.k[layer_id], pool.v[layer_id]
    k_cache[batch.out_cache_loc] = k.to(k_cache.dtype)
    v_cache[batch.out_cache_loc] = v.to(v_cache.dtype)
    return k_cache, v_cache


class TorchAttentionBackend:
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        batch: ForwardBatch,
        scale: float | None = None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        k_cache, v_cache = store_kv(layer_id, k, v, batch)
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
        groups = num_heads // num_kv_heads
        out = torch.empty_like(q)
        start = 0
        for extend_len, seq_len, idx in zip(batch.extend_lens, batch.seq_lens, batch.kv_indices, strict=True):
            prefix_len = seq_len - extend_len
            qi = q[start : start + extend_len].transpose(0, 1)  # [H, e, D]
            ki = k_cache[idx].to(q.dtype).transpose(0, 1)  # [KVH, s, D]
            vi = v_cache[idx].to(q.dtype).transpose(0, 1)
            if groups > 1:
                # query head h reads kv head h // groups (the layout HF's repeat_kv uses).
                ki = ki.repeat_interleave(groups, dim=0)
                vi = vi.repeat_interleave(groups, dim=0)
            mask = None
            if extend_len > 1:
                # query j sits at absolute position prefix_len + j and sees keys 0..prefix_len + j.
                qpos = torch.arange(prefix_len, seq_len, device=q.device)[:, None]
                kpos = torch.arange(seq_len, device=q.device)[None, :]
                mask = kpos <= qpos
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
            out[start : start + extend_len] = oi.transpose(0, 1)
            start += extend_len
        return out
