"""Architecture name (config.json's `architectures[0]`) -> model class."""

from __future__ import annotations

from services.scheduler.model.base import CausalLM
from services.scheduler.model.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from services.scheduler.model.llama import LlamaForCausalLM, Qwen2ForCausalLM

# Adding an architecture is one entry here plus its module, a CausalLM subclass (base.py). Which KV
# pool it needs: mla_pool.make_kv_pool.
MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(MODEL_REGISTRY)


def get_model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
