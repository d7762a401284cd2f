"""The Triton kernel backends and `--attention-backend` selection.

`--attention-backend triton` (the default on CUDA) switches a model to the Triton kernels of
services/scheduler/kernels: its attention backend, and every module with a `use_triton()` (RMSNorm
with the fused residual add, both rotary embeddings, DeepSeek's routed experts). `torch` keeps the
plain torch path, which is what runs on the CPU.

TritonAttentionBackend keeps TorchAttentionBackend's `forward` contract: write the step's K/V into
the pool at out_cache_loc, then attend over each request's whole sequence through kv_indices.
TritonMLABackend keeps TorchMLABackend's (mla.py): attention in the latent space over the MLA pool.
A batch of pure decodes (every extend_len == 1) takes the split-K decode kernel (GQA's, or the
absorbed MLA one); any batch with a prefill (mixed ones included) takes the extend kernel, where a
decode row is an extend of length 1 (MLA: multi-query attention with one latent "head" whose
first kv_lora_rank values are the value).

The kernels are imported when a backend is built, not when this module is: Triton fixes
interpreter-or-GPU per kernel at import time, and nothing on the CPU torch path should pay for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from services.scheduler.model.attention import AttentionBackend, TorchAttentionBackend, store_kv
from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.mla import MLABackend, TorchMLABackend
from shared.config import ATTENTION_BACKENDS


@dataclass
class _PagedMeta:
    """The batch's paged layout, built once per batch and shared by all layers."""

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    max_extend_len: int
    all_decode: bool


class PagedLayout:
    """The batch's paged layout as the kernels take it (CSR index tensors on the device), built
    once per batch and shared by every layer."""

    def __init__(self) -> None:
        from services.scheduler.kernels import paged

        self._paged = paged
        self._batch: ForwardBatch | None = None
        self._meta: _PagedMeta | None = None

    def of(self, batch: ForwardBatch, device: torch.device) -> _PagedMeta:
        if self._batch is not batch or self._meta is None:
            self._meta = _PagedMeta(
                qo_indptr=self._paged.indptr_from_lens(batch.extend_lens, device),
                kv_indptr=self._paged.indptr_from_lens(batch.seq_lens, device),
                kv_indices=self._paged.flatten_kv_indices(batch.kv_indices, device),
                max_extend_len=max(batch.extend_lens, default=0),
                all_decode=all(e == 1 for e in batch.extend_lens),
            )
            self._batch = batch
        return self._meta


class TritonAttentionBackend:
    def __init__(self, num_kv_splits: int = 8) -> None:
        from services.scheduler.kernels import decode_attention, extend_attention

        self._decode = decode_attention.decode_attention
        self._extend = extend_attention.extend_attention
        self._layout = PagedLayout()
        self.num_kv_splits = num_kv_splits

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
        meta = self._layout.of(batch, q.device)
        if meta.all_decode:
            return self._decode(
                q, k_cache, v_cache, meta.kv_indptr, meta.kv_indices, sm_scale, num_kv_splits=self.num_kv_splits
            )
        return self._extend(
            q, k_cache, v_cache, meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.max_extend_len, sm_scale
        )


class TritonMLABackend:
    def __init__(self, num_kv_splits: int = 8) -> None:
        from services.scheduler.kernels import extend_attention, mla_decode

        self._decode = mla_decode.mla_decode
        self._extend = extend_attention.extend_attention
        self._layout = PagedLayout()
        self.num_kv_splits = num_kv_splits

    def forward(
        self,
        q_latent: torch.Tensor,  # [T, H, C]
        q_rope: torch.Tensor,  # [T, H, R]
        cache: torch.Tensor,  # [size, 1, C + R]
        batch: ForwardBatch,
        scale: float,
    ) -> torch.Tensor:  # [T, H, C]
        meta = self._layout.of(batch, q_latent.device)
        if meta.all_decode:
            return self._decode(
                q_latent, q_rope.contiguous(), cache, meta.kv_indptr, meta.kv_indices, scale,
                num_kv_splits=self.num_kv_splits,
            )
        q = torch.cat([q_latent, q_rope], dim=-1)
        values = cache[..., : q_latent.shape[-1]]  # the latent c_kv: a strided view, no copy
        return self._extend(
            q, cache, values, meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.max_extend_len, scale
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


def install_attention_backend(model: nn.Module, name: str, device: torch.device | str) -> str:
    """Resolves `--attention-backend name` on `device` (ValueError if it cannot run there) and, for
    triton, moves `model` onto the Triton kernels: its attention backend (GQA or MLA, by what it
    holds) and every submodule with a `use_triton()`. Call it once, after the weights are loaded
    (the MoE experts' weights are stacked then). Returns what was chosen, for the startup log."""
    chosen = resolve_attention_backend(name, device)
    if chosen != "triton":
        return chosen
    current = getattr(model, "attn_backend", None)
    backend: AttentionBackend | MLABackend
    if isinstance(current, TorchAttentionBackend):
        backend = TritonAttentionBackend()
    elif isinstance(current, TorchMLABackend):
        backend = TritonMLABackend()
    else:
        raise ValueError(f"{type(model).__name__} has no attention backend the Triton kernels replace")
    model.attn_backend = backend  # type: ignore[assignment]
    switched = [m for m in model.modules() if hasattr(m, "use_triton")]
    for m in switched:
        m.use_triton()
    kinds = sorted({type(m).__name__ for m in switched})
    return f"triton ({type(backend).__name__}; {', '.join(kinds)})"
