"""Architecture name (config.json's `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from services.scheduler.model.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from services.scheduler.model.llama import LlamaForCausalLM, Qwen2ForCausalLM

# Adding an architecture is one entry here plus its module; the class takes (ModelConfig) and has
# forward(ForwardBatch) -> [B, vocab]. Which KV pool it needs: mla_pool.make_kv_pool.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
