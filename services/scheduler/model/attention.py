"""Attention over the KV pool, in plain torch (SDPA: one call for all decodes, one per prefill).

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


class _TorchLayout:
    """One batch as the torch backend attends over it, built once per batch and shared by every
    layer: the decode rows (extend_len 1) in one padded SDPA call, each extend (prefill chunk)
    in a call of its own."""

    def __init__(self, batch: ForwardBatch) -> None:
        self.batch = batch
        starts = [0]
        for e in batch.extend_lens:
            starts.append(starts[-1] + e)
        self.extends = [
            (starts[i], e, s, idx)
            for i, (e, s, idx) in enumerate(zip(batch.extend_lens, batch.seq_lens, batch.kv_indices, strict=True))
            if e > 1
        ]
        decodes = [i for i, e in enumerate(batch.extend_lens) if e == 1]
        device = batch.input_ids.device
        # rows of q that decode (None: every row does), their slots [Bd, S] padded with slot 0,
        # and the mask of real keys [Bd, 1, 1, S] (None: nothing is padded)
        self.decode_rows: torch.Tensor | None = None
        self.decode_kv: torch.Tensor | None = None
        self.decode_mask: torch.Tensor | None = None
        if not decodes:
            return
        if len(decodes) < len(batch.extend_lens):
            self.decode_rows = torch.tensor([starts[i] for i in decodes], device=device)
        lens = [batch.seq_lens[i] for i in decodes]
        width = max(lens)
        if min(lens) == width:
            self.decode_kv = torch.stack([batch.kv_indices[i] for i in decodes])
            return
        self.decode_kv = torch.zeros(len(decodes), width, dtype=torch.long, device=device)
        for row, i in enumerate(decodes):
            self.decode_kv[row, : lens[row]] = batch.kv_indices[i]
        real = torch.arange(width, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        self.decode_mask = real[:, None, None, :]


class TorchAttentionBackend:
    """Decodes batched: the query heads that share a kv head are stacked as that head's queries
    ([B, KVH, G, D] against K [B, KVH, S, D]), so no K/V is repeated. Prefill chunks attend one
    request at a time under a causal mask (SDPA's own GQA), where the per-call cost is amortized
    over the chunk."""

    def __init__(self) -> None:
        self._layout: _TorchLayout | None = None

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
        if self._layout is None or self._layout.batch is not batch:
            self._layout = _TorchLayout(batch)
        layout = self._layout
        groups = q.shape[1] // k_cache.shape[1]  # query heads per kv head
        if layout.decode_kv is not None and not layout.extends:
            return self._decode(q, k_cache, v_cache, layout, groups, scale)
        out = torch.empty_like(q)
        if layout.decode_kv is not None:
            rows = layout.decode_rows
            out[rows] = self._decode(q[rows], k_cache, v_cache, layout, groups, scale)
        for start, extend_len, seq_len, idx in layout.extends:
            # query j sits at absolute position prefix_len + j and sees keys 0..prefix_len + j.
            qpos = torch.arange(seq_len - extend_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
            qi = q[start : start + extend_len].transpose(0, 1)  # [H, e, D]
            ki = k_cache[idx].to(q.dtype).transpose(0, 1)  # [KVH, s, D]
            vi = v_cache[idx].to(q.dtype).transpose(0, 1)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=groups > 1)
            out[start : start + extend_len] = oi.transpose(0, 1)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: _TorchLayout, groups: int,
        scale: float | None,
    ) -> torch.Tensor:
        """One query per request: [Bd, H, D] -> [Bd, H, D]. Query head h reads kv head h // groups
        (the layout of HF's repeat_kv), so viewing q as [Bd, KVH, G, D] lines each group up with
        its kv head."""
        bd, num_heads, head_dim = q.shape
        assert layout.decode_kv is not None
        kd = k_cache[layout.decode_kv].to(q.dtype).transpose(1, 2)  # [Bd, KVH, S, D]
        vd = v_cache[layout.decode_kv].to(q.dtype).transpose(1, 2)
        qd = q.view(bd, num_heads // groups, groups, head_dim)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=layout.decode_mask, scale=scale)
        return od.reshape(bd, num_heads, head_dim)
