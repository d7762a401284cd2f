"""Llama-family decoder (Llama 2/3, Qwen2) over a ForwardBatch.

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
from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.layers import RMSNorm, RotaryEmbedding, pre_norm_layer
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


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, linears: Linears) -> None:
        super().__init__()
        self.linears = linears
        self.self_attn = LlamaAttention(config, layer_id, linears.attn)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, linears.mlp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        rotary: RotaryEmbedding,
        backend: AttentionBackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pre_norm_layer(self, x, residual, lambda h: self.self_attn(h, batch, rotary, backend))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, linears: Linears) -> None:
        super().__init__()
        self.embed_tokens = linears.attn.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, linears) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, backend: AttentionBackend) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch, self.rotary_emb, backend)
        return x if residual is None else x + residual  # [T, hidden], before the final norm


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        linears: Linears | None = None,
        attn_backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        lin = linears or Linears()
        self.config = config
        self.attn_backend: AttentionBackend = attn_backend or TorchAttentionBackend()
        self.model = LlamaModel(config, lin)
        self.lm_head = lin.attn.lm_head(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tied_parameter_names(self) -> set[str]:
        """Names that alias another parameter and so may be absent from a checkpoint."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [B, vocab] of each request's last new token."""
        batch = batch.to(self.lm_head.weight.device)
        hidden = self.model(batch, self.attn_backend)
        last = hidden[batch.last_token_index()]
        return self.lm_head(self.model.norm(last)).float()


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases; ModelConfig.from_hf sets attention_bias for this architecture."""
