"""Llama-family decoder (Llama 2/3, Qwen2) over a ForwardBatch.

Parameter names equal Hugging Face's, so a checkpoint loads by name. Qwen2 is the same network
with biases on q/k/v (config.attention_bias is True for it).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from services.scheduler.model.attention import TorchAttentionBackend
from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.layers import GatedMLP, RMSNorm, RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        rotary: RotaryEmbedding,
        backend: TorchAttentionBackend,
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(batch.positions, q, k)
        o = backend.forward(self.layer_id, q, k, v, batch, scale=self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        rotary: RotaryEmbedding,
        backend: TorchAttentionBackend,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, rotary, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(self, batch: ForwardBatch, backend: TorchAttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch, self.rotary_emb, backend)
        return x  # [T, hidden], before the final norm


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: TorchAttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        self.attn_backend = attn_backend or TorchAttentionBackend()
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tied_parameter_names(self) -> set[str]:
        """Names that alias another parameter and so may be absent from a checkpoint."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [B, vocab] of each request's last new token."""
        device = self.lm_head.weight.device
        if batch.input_ids.device != device:
            # Batches are built on the CPU by default; the copies are tiny next to the forward.
            batch = dataclasses.replace(
                batch,
                input_ids=batch.input_ids.to(device),
                positions=batch.positions.to(device),
                out_cache_loc=batch.out_cache_loc.to(device),
                kv_indices=[i.to(device) for i in batch.kv_indices],
            )
        hidden = self.model(batch, self.attn_backend)
        last = hidden[batch.last_token_index()]
        return self.lm_head(self.model.norm(last)).float()


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases; ModelConfig.from_hf sets attention_bias for this architecture."""
