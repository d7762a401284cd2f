"""Sim checkpoints: a real model's config.json and the tiny test tokenizer, no weights, for
`--device sim` (the cost model reads only the config's shapes).

    python -m services.scheduler.sim.checkpoints DIR [--model deepseek-v3|llama-70b]

The shapes are those of the published configs: DeepSeek-V3 (671B total, 37B active: 61 layers,
hidden 7168, MLA with kv_lora_rank 512 + rope 64, 256 routed experts top-8 + 1 shared, first 3
layers dense, fp8 weights) and Llama-3.x-70B (80 layers, hidden 8192, 64 heads, 8 KV heads,
intermediate 28672; fp8 weights here, so one H200 holds a replica). The token ids the tokenizer
knows are far fewer than the config's vocab_size; the simulated rank generates ids the tokenizer
has, and the cost model uses the config's vocabulary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.launcher.tiny_model import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    IM_END,
    IM_START,
    train_tokenizer,
)

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

CONFIGS: dict[str, dict[str, Any]] = {
    "deepseek-v3": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_shared_experts": 1, "n_routed_experts": 256, "num_experts_per_tok": 8, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "hidden_act": "silu", "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
        "quantization_config": FP8,
    },
    "llama-70b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "bfloat16",
        "quantization_config": FP8,
    },
}


def write_sim_checkpoint(out: str | Path, model: str) -> Path:
    """`out`/config.json (the model's shapes) and the tiny tokenizer's files; returns `out`."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    tokenizer.save(str(d / "tokenizer.json"))
    bos, eos, im_end = (tokenizer.token_to_id(t) for t in (BOS_TOKEN, EOS_TOKEN, IM_END))
    config = CONFIGS[model] | {"bos_token_id": bos, "eos_token_id": eos}
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
               "additional_special_tokens": [IM_START, IM_END]}
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": bos, "eos_token_id": [eos, im_end]},
        "special_tokens_map.json": special,
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False,
                                  "add_eos_token": False, "model_max_length": config["max_position_embeddings"],
                                  "chat_template": CHAT_TEMPLATE},
    }
    for name, obj in files.items():
        (d / name).write_text(json.dumps(obj, indent=2) + "\n")
    return d


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--model", choices=sorted(CONFIGS), default="deepseek-v3")
    ns = p.parse_args(argv)
    print(write_sim_checkpoint(ns.dir, ns.model))


if __name__ == "__main__":
    main()
