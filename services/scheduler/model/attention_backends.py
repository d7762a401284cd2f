"""The Triton attention backend and `--attention-backend` selection.

TritonAttentionBackend keeps TorchAttentionBackend's `forward` contract: write the step's K/V into
the pool at out_cache_loc, then attend over each request's whole sequence through kv_indices.
A batch of pure decodes (every extend_len == 1) takes the split-K decode kernel; any batch with a
prefill (mixed ones included) takes the extend kernel, where a decode row is an extend of length 1.

The kernels are imported when the backend is built, not when this module is: Triton fixes
interpreter-or-GPU per kernel at import time, and nothing on the CPU torch path should pay for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from services.scheduler.model.attention import TorchAttentionBackend, store_kv
from services.scheduler.model.batch import ForwardBatch
from shared.config import ATTENTION_BACKENDS


class AttentionBackend(Protocol):
    def forward(
        self,
        layer_id: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: ForwardBatch,
        scale: float | None = None,
    ) -> torch.Tensor: ...


@dataclass
class _PagedMeta:
    """The batch's paged layout, built once per batch and shared by all layers."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    max_extend_len: int
    all_decode: bool


class TritonAttentionBackend:
    def __init__(self, num_kv_splits: int = 8) -> None:
        from services.scheduler.kernels import decode_attention, extend_attention, paged

        self._decode = decode_attention.decode_attention
        self._extend = extend_attention.extend_attention
        self._paged = paged
        self.num_kv_splits = num_kv_splits
        self._meta_batch: ForwardBatch | None = None
        self._meta: _PagedMeta | None = None

    def _meta_for(self, batch: ForwardBatch, device: torch.device) -> _PagedMeta:
        if self._meta_batch is not batch or self._meta is None:
            self._meta = _PagedMeta(
                qo_indptr=self._paged.indptr_from_lens(batch.extend_lens, device),
                kv_indptr=self._paged.indptr_from_lens(batch.seq_lens, device),
                kv_indices=self._paged.flatten_kv_indices(batch.kv_indices, device),
                max_extend_len=max(batch.extend_lens, default=0),
                all_decode=all(e == 1 for e in batch.extend_lens),
            )
            self._meta_batch = batch
        return self._meta

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
        sm_scale = scale if scale is not None else q.shape[-1] ** -0.5
        q = q.contiguous()
        meta = self._meta_for(batch, q.device)
        if meta.all_decode:
            return self._decode(
                q, k_cache, v_cache, meta.kv_indptr, meta.kv_indices, sm_scale, num_kv_splits=self.num_kv_splits
            )
        return self._extend(
            q, k_cache, v_cache, meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.max_extend_len, sm_scale
        )


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """'torch' or 'triton' for `--attention-backend name` on `device` (auto: triton on CUDA)."""
    device = torch.device(device)
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown --attention-backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"--attention-backend triton needs a CUDA device (got {device}); "
            "on the CPU it runs only under TRITON_INTERPRET=1, for tests"
        )
    return name


def select_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    if resolve_attention_backend(name, device) == "triton":
        return TritonAttentionBackend()
    return TorchAttentionBackend()


def install_attention_backend(model: object, name: str, device: torch.device | str) -> str:
    """Resolves `--attention-backend name` on `device` (ValueError if it cannot run there) and sets
    it on a model whose attention is pluggable (the Llama family: an `attn_backend` holding a
    TorchAttentionBackend). Returns what the model attends with, for the startup log; a model with
    its own attention path (DeepSeek's MLA) keeps it."""
    chosen = resolve_attention_backend(name, device)
    if not isinstance(getattr(model, "attn_backend", None), TorchAttentionBackend):
        return f"{type(model).__name__}'s own attention (--attention-backend {name} does not apply)"
    model.attn_backend = select_attention_backend(chosen, device)  # type: ignore[attr-defined]
    return chosen
