"""The decoder both model families are: token embedding, pre-norm layers over a residual stream,
final norm, LM head. A family (llama.py, deepseek.py) says only what differs: its attention and
feed-forward blocks (its DecoderLayer subclass), its rotary embedding, and the attention backend
it runs on when none is given.

Parameter names are Hugging Face's (model.embed_tokens, model.layers.{i}.{self_attn,mlp,
input_layernorm,post_attention_layernorm}, model.norm, lm_head), so a checkpoint loads by name.
`DecoderModel.forward` stops before the final norm: `CausalLM.forward` normalizes only the last
token of each request, the engine only the rows it asks logits for.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn

from services.scheduler.model.attention import AttentionBackend
from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.layers import RMSNorm, Rotary
from services.scheduler.model.mla import MLABackend
from services.scheduler.model.parallel import Linears

Backend = AttentionBackend | MLABackend


class DecoderLayer(nn.Module):
    """One pre-norm layer: input_layernorm, attention, post_attention_layernorm, then the
    feed-forward block run by `linears.around_mlp`. Returns (the feed-forward output, the
    residual before it): the add onto the residual happens inside the next norm, which fuses it
    on the Triton path; `residual` is None at the first layer."""

    def __init__(self, config: ModelConfig, linears: Linears, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.linears = linears
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        rotary: Rotary,
        backend: Backend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, batch, rotary, backend), residual)
        return self.linears.around_mlp(h, self.mlp), residual


class LayerFactory(Protocol):
    """A family's DecoderLayer subclass: (config, layer_id, linears) -> that layer."""

    def __call__(self, config: ModelConfig, layer_id: int, linears: Linears) -> DecoderLayer: ...


class BackendFactory(Protocol):
    """A family's torch attention backend class."""

    def __call__(self) -> Backend: ...


class DecoderModel(nn.Module):
    """Embedding, layers and final norm; the layers share one rotary embedding."""

    def __init__(self, config: ModelConfig, linears: Linears, layer: LayerFactory, rotary: Rotary) -> None:
        super().__init__()
        self.embed_tokens = linears.attn.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer(config, i, linears) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary

    def forward(self, batch: ForwardBatch, backend: Backend) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch, self.rotary_emb, backend)
        return x if residual is None else x + residual  # [T, hidden], before the final norm


class CausalLM(nn.Module):
    """A registered architecture: `CausalLM(config, linears, attn_backend)` and
    `forward(batch) -> [B, vocab]`. Subclasses set `layer_class`, `backend_class` (the backend
    used when none is given) and `make_rotary`."""

    layer_class: ClassVar[LayerFactory]
    backend_class: ClassVar[BackendFactory]
    keep_fp32_suffixes: ClassVar[tuple[str, ...]] = ()  # parameters the loader keeps float32

    def __init__(
        self, config: ModelConfig, linears: Linears | None = None, attn_backend: Backend | None = None
    ) -> None:
        super().__init__()
        lin = linears or Linears()
        self.config = config
        self.attn_backend: Backend = attn_backend or self.backend_class()
        self.model = DecoderModel(config, lin, self.layer_class, self.make_rotary(config))
        self.lm_head = lin.attn.lm_head(config.hidden_size, config.vocab_size)
        self.tie_weights()

    def make_rotary(self, config: ModelConfig) -> Rotary:
        """The rotary embedding all layers share (its layout and frequencies are per family)."""
        raise NotImplementedError

    def tie_weights(self) -> None:
        """With tie_word_embeddings the LM head is the embedding matrix. The loader calls it again
        after assigning loaded tensors, which replaces the embedding's parameter."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tied_parameter_names(self) -> set[str]:
        """Names that alias another parameter and so may be absent from a checkpoint."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [B, vocab] of each request's last new token."""
        batch = batch.to(self.model.norm.weight.device)
        hidden = self.model(batch, self.attn_backend)
        last = hidden[batch.last_token_index()]
        return self.lm_head(self.model.norm(last)).float()
