"""Llama-family decoder (Llama 2/3, Qwen2): GQA attention and a dense gated MLP in every layer,
on the CausalLM skeleton of base.py.

Parameter names equal Hugging Face's, so a checkpoint loads by name. Qwen2 is the same network
with biases on q/k/v (config.attention_bias is True for it). Layers come from a `Linears` builder
(parallel.py): under tensor parallelism q/k/v and gate/up are column-split (a rank holds
num_heads / tp query heads and num_kv_heads / tp kv heads), o and down row-split, so the KV pool of
a rank holds only its kv heads.
"""

from __future__ import annotations

import torch
from torch import nn

from services.scheduler.model.attention import AttentionBackend, TorchAttentionBackend
from services.scheduler.model.base import CausalLM, DecoderLayer
from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.layers import RotaryEmbedding
from services.scheduler.model.moe import MLP
from services.scheduler.model.parallel import Linears, fuse_linears, keep_out_of_state_dict


def local_kv_heads(config: ModelConfig, attn_tp_size: int) -> int:
    """KV heads one rank of an attention TP group holds."""
    if config.num_key_value_heads % attn_tp_size or config.num_attention_heads % attn_tp_size:
        raise ValueError(
            f"attention heads ({config.num_attention_heads}) and kv heads ({config.num_key_value_heads}) "
            f"must be divisible by the attention TP size ({attn_tp_size})"
        )
    return config.num_key_value_heads // attn_tp_size


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, linears: Linears) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_kv_heads = local_kv_heads(config, linears.tp_size)
        self.num_heads = config.num_attention_heads // linears.tp_size
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        q_out, kv_out = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = linears.column(hidden, q_out, bias=bias)
        self.k_proj = linears.column(hidden, kv_out, bias=bias)
        self.v_proj = linears.column(hidden, kv_out, bias=bias)
        self.o_proj = linears.row(q_out, hidden, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        """After loading: q, k and v as one GEMM (single-device layers only)."""
        self.qkv_proj = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        keep_out_of_state_dict(self, "qkv_proj")

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        if t == 0:  # an idle batch (DP attention): no rows, and o_proj's collective is skipped
            return torch.zeros_like(x)
        if self.qkv_proj is not None and rotary.uses_torch:
            qkv = self.qkv_proj(x).view(t, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            # q and k heads lie side by side: rotated as one tensor, then split
            qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
            q, k = rotary.rotate(batch.positions, qk).split([self.num_heads, self.num_kv_heads], dim=1)
        elif self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).view(t, -1, self.head_dim).split(
                [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1
            )
            q, k = rotary(batch.positions, q, k)
        else:
            q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
            q, k = rotary(batch.positions, q, k)
        o = backend.forward(self.layer_id, q, k, v, batch, scale=self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaDecoderLayer(DecoderLayer):
    """GQA attention, dense gated MLP."""

    def __init__(self, config: ModelConfig, layer_id: int, linears: Linears) -> None:
        attn = LlamaAttention(config, layer_id, linears.attn)
        mlp = MLP(config.hidden_size, config.intermediate_size, linears.mlp)
        super().__init__(config, linears, attn, mlp)


class LlamaForCausalLM(CausalLM):
    layer_class = LlamaDecoderLayer
    backend_class = TorchAttentionBackend

    def make_rotary(self, config: ModelConfig) -> RotaryEmbedding:
        return RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases; ModelConfig.from_hf sets attention_bias for this architecture."""
