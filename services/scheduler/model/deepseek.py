"""DeepSeek V2 / V3 decoder over a ForwardBatch: MLA attention (latent KV cache, see mla.py) and
MoE feed-forward (see moe.py) in every layer i with moe.is_moe_layer(i), a dense MLP elsewhere.

Parameter names equal Hugging Face's checkpoint names (experts stored one module per expert:
mlp.experts.{e}.{gate,up,down}_proj.weight), so a checkpoint loads by name. The KV pool must
be an MLAKVPool (mla_pool.make_kv_pool picks it from the config). Attention, embedding and LM head
are built by `linears.attn`, the feed-forward blocks by `linears.mlp` (parallel.py).
"""

from __future__ import annotations

import torch
from torch import nn

from services.scheduler.model.batch import ForwardBatch
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.layers import RMSNorm, pre_norm_layer
from services.scheduler.model.mla import DeepseekRotary, MLAAttention, MLABackend, TorchMLABackend
from services.scheduler.model.moe import MLP, DeepseekMoE
from services.scheduler.model.parallel import Linears


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, linears: Linears) -> None:
        super().__init__()
        assert config.moe is not None
        self.linears = linears
        self.self_attn = MLAAttention(config, layer_id, linears.attn)
        self.mlp: nn.Module
        ffn = linears.mlp
        if config.moe.is_moe_layer(layer_id):
            self.mlp = DeepseekMoE(config, ffn, ffn.expert_ids(config.moe), ffn.reduce)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, ffn)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        batch: ForwardBatch,
        rotary: DeepseekRotary,
        backend: MLABackend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return pre_norm_layer(self, x, residual, lambda h: self.self_attn(h, batch, rotary, backend))


class DeepseekModel(nn.Module):
    def __init__(self, config: ModelConfig, linears: Linears) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None, "DeepSeek configs carry an MLA section"
        self.embed_tokens = linears.attn.embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DeepseekDecoderLayer(config, i, linears) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeepseekRotary(
            mla.qk_rope_head_dim, config.rope_theta, config.rope_scaling, mla.rope_interleave
        )

    def forward(self, batch: ForwardBatch, backend: MLABackend) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, batch, self.rotary_emb, backend)
        return x if residual is None else x + residual  # [T, hidden], before the final norm


class DeepseekV2ForCausalLM(nn.Module):
    keep_fp32_suffixes = ("e_score_correction_bias",)  # the loader keeps these float32

    def __init__(
        self, config: ModelConfig, linears: Linears | None = None, attn_backend: MLABackend | None = None
    ) -> None:
        super().__init__()
        lin = linears or Linears()
        self.config = config
        self.attn_backend: MLABackend = attn_backend or TorchMLABackend()
        self.model = DeepseekModel(config, lin)
        self.lm_head = lin.attn.lm_head(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
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


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """Same network; ModelConfig.from_hf gives V3 sigmoid + grouped top-k routing with the
    correction bias, and the rope_interleave flag."""
