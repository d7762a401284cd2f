"""The KV pool a model needs: MLAKVPool (one latent row per token per layer) for MLA models,
KVPool (K and V per kv head) for the rest. make_kv_pool picks by config; kv_bytes_per_token
is what a memory budget divides by.
"""

from __future__ import annotations

import torch

from services.scheduler.model.config import ModelConfig
from services.scheduler.model.kv_pool import KVPool


class MLAKVPool(KVPool):
    """kv[layer]: [size, 1, kv_lora_rank + qk_rope_head_dim] — row s holds slot s's normalized
    latent c_kv then its rotated k_rope. Slot allocation (alloc/free/num_free/check) is
    KVPool's, inherited unchanged: the base is built with zero K/V layers, so it owns only the
    allocator, and this class owns the latent buffers."""

    def __init__(
        self,
        num_layers: int,
        size: int,
        kv_cache_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(0, size, 1, kv_cache_dim, dtype, device)
        self.num_layers = num_layers
        self.kv_cache_dim = kv_cache_dim
        self.kv: list[torch.Tensor] = [
            torch.zeros((size, 1, kv_cache_dim), dtype=dtype, device=self.device) for _ in range(num_layers)
        ]

    def buffers(self) -> list[torch.Tensor]:
        return self.kv

    @property
    def bytes_per_token(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in self.kv)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Cache bytes one token takes across all layers, for the pool make_kv_pool builds."""
    elem = torch.empty(0, dtype=dtype).element_size()
    if config.mla is not None:
        return config.num_hidden_layers * config.mla.kv_cache_dim * elem
    return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * elem


def make_kv_pool(
    config: ModelConfig, size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> KVPool:
    """The pool `config`'s model reads and writes, with `size` token slots."""
    if config.mla is not None:
        return MLAKVPool(config.num_hidden_layers, size, config.mla.kv_cache_dim, dtype, device)
    return KVPool(config.num_hidden_layers, size, config.num_key_value_heads, config.head_dim, dtype, device)
