"""Attention over the KV pool, in plain torch (SDPA: one call for all decodes, one per prefill).

The backend is the only code that touches the pool's K/V tensors: it writes the step's new K/V
at out_cache_loc, then reads each request's whole sequence back through kv_indices. A faster
backend (Triton, FlashInfer) replaces this class and keeps its `forward` signature.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from services.scheduler.cpu import load_decode_attention
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
    layer: the decode rows (extend_len 1) in one call, each extend (prefill chunk) in a call of
    its own."""

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
        self.decodes = [i for i, e in enumerate(batch.extend_lens) if e == 1]
        self.device = batch.input_ids.device
        # rows of q that decode; None when every row does
        self.decode_rows: torch.Tensor | None = None
        if self.decodes and len(self.decodes) < len(batch.extend_lens):
            self.decode_rows = torch.tensor([starts[i] for i in self.decodes], device=self.device)
        self._csr: tuple[torch.Tensor, torch.Tensor] | None = None
        self._padded: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' slots as (kv_indptr [Bd + 1], kv_indices), for the C kernel."""
        if self._csr is None:
            lens = torch.tensor([self.batch.seq_lens[i] for i in self.decodes], dtype=torch.long)
            indptr = torch.zeros(len(self.decodes) + 1, dtype=torch.long)
            torch.cumsum(lens, 0, out=indptr[1:])
            self._csr = indptr, torch.cat([self.batch.kv_indices[i] for i in self.decodes]).to(torch.long)
        return self._csr

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decodes' slots [Bd, S] padded with slot 0, and the mask of real keys [Bd, 1, 1, S]
        (None when nothing is padded), for SDPA."""
        if self._padded is None:
            lens = [self.batch.seq_lens[i] for i in self.decodes]
            width = max(lens)
            if min(lens) == width:
                self._padded = torch.stack([self.batch.kv_indices[i] for i in self.decodes]), None
            else:
                slots = torch.zeros(len(self.decodes), width, dtype=torch.long, device=self.device)
                for row, i in enumerate(self.decodes):
                    slots[row, : lens[row]] = self.batch.kv_indices[i]
                real = torch.arange(width, device=self.device)[None, :] < torch.tensor(lens, device=self.device)[:, None]
                self._padded = slots, real[:, None, None, :]
        return self._padded


class TorchAttentionBackend:
    """Decodes batched: on the CPU in float32 through the C kernel of services/scheduler/cpu
    (reads each request's K/V through its slot list, no copy); elsewhere one SDPA call over a
    padded gather, with the query heads that share a kv head stacked as that head's queries
    ([B, KVH, G, D] against K [B, KVH, S, D]) so no K/V is repeated. Prefill chunks attend one
    request at a time under a causal mask (SDPA's own GQA), the per-call cost amortized over
    the chunk."""

    def __init__(self) -> None:
        self._layout: _TorchLayout | None = None
        self._kernel = load_decode_attention()

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
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        if layout.decodes and not layout.extends:
            return self._decode(q, k_cache, v_cache, layout, scale)
        out = torch.empty_like(q)
        if layout.decodes:
            rows = layout.decode_rows
            out[rows] = self._decode(q[rows], k_cache, v_cache, layout, scale)
        groups = q.shape[1] // k_cache.shape[1]  # query heads per kv head
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

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: _TorchLayout, scale: float
    ) -> torch.Tensor:
        """One query per request: [Bd, H, D] -> [Bd, H, D]. Query head h reads kv head h // groups
        (the layout of HF's repeat_kv)."""
        if self._kernel is not None and q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32:
            indptr, indices = layout.csr()
            return self._kernel(q.contiguous(), k_cache, v_cache, indptr, indices, scale)
        bd, num_heads, head_dim = q.shape
        groups = num_heads // k_cache.shape[1]
        slots, mask = layout.padded()
        kd = k_cache[slots].to(q.dtype).transpose(1, 2)  # [Bd, KVH, S, D]
        vd = v_cache[slots].to(q.dtype).transpose(1, 2)
        qd = q.view(bd, num_heads // groups, groups, head_dim)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        return od.reshape(bd, num_heads, head_dim)
