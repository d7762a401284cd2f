"""DeepSeek V2 / V3 decoder over a ForwardBatch: MLA attention (latent KV cache, see mla.py) and
MoE feed-forward (see moe.py) in every layer i with moe.is_moe_layer(i), a dense MLP elsewhere.

Parameter names equal Hugging Face's checkpoint names (experts stored one module per expert:
mlp.experts.{e}.{gate,up,down}_proj.weight), so a checkpoint loads by name. The KV pool must
be an MLAKVPool (mla_pool.make_kv_pool picks it from the config). Attention, embedding and LM head
are built by `linears.attn`, the feed-forward blocks by `linears.mlp` (parallel.py). Embedding,
norms, LM head and the forward over the layers are the CausalLM skeleton of base.py.
"""

from __future__ import annotations

from torch import nn

from services.scheduler.model.base import CausalLM, DecoderLayer
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.mla import DeepseekRotary, MLAAttention, TorchMLABackend
from services.scheduler.model.moe import MLP, DeepseekMoE
from services.scheduler.model.parallel import Linears


class DeepseekDecoderLayer(DecoderLayer):
    """MLA attention; MoE feed-forward where moe.is_moe_layer(layer_id), a dense MLP elsewhere."""

    def __init__(self, config: ModelConfig, layer_id: int, linears: Linears) -> None:
        assert config.moe is not None
        attn = MLAAttention(config, layer_id, linears.attn)
        ffn = linears.mlp
        mlp: nn.Module
        if config.moe.is_moe_layer(layer_id):
            mlp = DeepseekMoE(config, ffn, ffn.expert_ids(config.moe), ffn.reduce)
        else:
            mlp = MLP(config.hidden_size, config.intermediate_size, ffn)
        super().__init__(config, linears, attn, mlp)


class DeepseekV2ForCausalLM(CausalLM):
    layer_class = DeepseekDecoderLayer
    backend_class = TorchMLABackend
    keep_fp32_suffixes = ("e_score_correction_bias",)

    def make_rotary(self, config: ModelConfig) -> DeepseekRotary:
        mla = config.mla
        assert mla is not None, "DeepSeek configs carry an MLA section"
        return DeepseekRotary(
            mla.qk_rope_head_dim, config.rope_theta, config.rope_scaling, mla.rope_interleave
        )


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """Same network; ModelConfig.from_hf gives V3 sigmoid + grouped top-k routing with the
    correction bias, and the rope_interleave flag."""
