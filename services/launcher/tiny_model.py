"""create_tiny_model: a complete, deterministic Hugging Face checkpoint small enough for CPU tests.

The directory holds config.json, generation_config.json, model.safetensors (random weights from a
seeded generator), and a byte-level BPE tokenizer trained on corpus/*.txt (tokenizer.json,
tokenizer_config.json with a ChatML chat template, special_tokens_map.json). Same seed and arch ->
byte-identical files. The directory appears atomically: it is built under a temp name beside the
target and renamed into place, so a reader never sees a half-written checkpoint.

CLI: python -m services.launcher.tiny_model DIR [--arch llama|qwen2|deepseek_v2|deepseek_v3] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if TYPE_CHECKING:
    import torch

CORPUS_DIR = Path(__file__).parent / "corpus"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)  # ids 0..3, in this order

TOKENIZER_VOCAB_SIZE = 1000
HIDDEN_SIZE = 64
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 128
MAX_POSITIONS = 2048
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
SIZE_DEFAULTS = {
    "hidden_size": HIDDEN_SIZE,
    "num_layers": NUM_LAYERS,
    "num_heads": NUM_HEADS,
    "num_kv_heads": NUM_KV_HEADS,
    "intermediate_size": INTERMEDIATE_SIZE,
}

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "deepseek_v2"),
    "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3"),
}

# DeepSeek (MLA + MoE): layer 0 dense, layers 1.. MoE with 8 routed experts in 2 groups.
DEEPSEEK_NUM_LAYERS = 3
DEEPSEEK_MLA = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
DEEPSEEK_Q_LORA_RANK = {"deepseek_v2": None, "deepseek_v3": 48}  # V2-Lite style: q_proj straight
DEEPSEEK_MOE = {
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "n_group": 2,
    "topk_group": 1,
}

# ChatML. Content may be a string or a list of OpenAI-style parts, of which text parts are kept.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_dir() -> Path:
    """$DPSERVE_CACHE_DIR/tiny-llama, or ~/.cache/dpserve/tiny-llama."""
    cache = os.environ.get("DPSERVE_CACHE_DIR") or Path.home() / ".cache" / "dpserve"
    return Path(cache) / "tiny-llama"


def ensure_tiny_model(dir: str | Path | None = None) -> Path:
    """The tiny llama checkpoint at `dir` (default_model_dir() if None), created if absent."""
    out = Path(dir) if dir is not None else default_model_dir()
    if _is_complete(out):
        return out
    return _create(out, arch="llama", seed=0, replace=False)


def create_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0, **sizes: int) -> Path:
    """Write the tiny checkpoint to out_dir (replacing what is there) and return out_dir.

    `sizes` overrides the shape for bigger random models (benchmarks): hidden_size, num_layers,
    num_heads, num_kv_heads, intermediate_size. Without them the output is the default tiny model.

    Replacing a complete dir swaps it by two renames, so readers may briefly find out_dir absent;
    ensure_tiny_model never replaces one."""
    unknown = set(sizes) - set(SIZE_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown size overrides {sorted(unknown)}; choose from {sorted(SIZE_DEFAULTS)}")
    return _create(Path(out_dir), arch=arch, seed=seed, replace=True, sizes=sizes)


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in _REQUIRED_FILES)


def _create(out: Path, arch: str, seed: int, replace: bool, sizes: dict[str, int] | None = None) -> Path:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_checkpoint(tmp, arch, seed, sizes or {})
        _make_readable(tmp)
        _publish(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path, replace: bool) -> None:
    """Rename tmp onto out. rename(2) replaces an empty dir atomically but not a full one."""
    for _ in range(5):
        try:
            os.rename(tmp, out)
            return
        except OSError:
            if not out.exists():
                raise
        if not replace and _is_complete(out):
            return  # another process published first; by determinism its files equal ours
        # Move the old dir aside (one rename) and retry; a racing writer may publish in between.
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.rename(out, trash / "old")
        except FileNotFoundError:
            pass  # someone else moved it already
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    raise OSError(f"could not publish {out}: other writers keep replacing it")


def _make_readable(d: Path) -> None:
    # mkdtemp (and safetensors) create owner-only files; a shared cache wants the umask's modes.
    umask = os.umask(0)
    os.umask(umask)
    d.chmod(0o777 & ~umask)
    for f in d.iterdir():
        f.chmod(0o666 & ~umask)


def _write_checkpoint(d: Path, arch: str, seed: int, sizes: dict[str, int]) -> None:
    # torch only here: `dpserve serve` imports this module for ARCHITECTURES, and importing torch
    # would add seconds to every launcher start
    from safetensors.torch import save_file

    tokenizer = train_tokenizer()
    tokenizer.save(str(d / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    config = _hf_config(arch, vocab_size, bos_id=ids[BOS_TOKEN], eos_id=ids[EOS_TOKEN], sizes=sizes)
    _write_json(d / "config.json", config)
    _write_json(
        d / "generation_config.json",
        {
            "bos_token_id": ids[BOS_TOKEN],
            # a chat turn ends with <|im_end|>; raw text ends with <|end_of_text|>.
            "eos_token_id": [ids[EOS_TOKEN], ids[IM_END]],
            "do_sample": False,
        },
    )
    save_file(random_weights(config, seed), str(d / "model.safetensors"), metadata={"format": "pt"})

    special_map = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }
    _write_json(d / "special_tokens_map.json", special_map)
    _write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
            "chat_template": CHAT_TEMPLATE,
        },
    )


def train_tokenizer() -> Tokenizer:
    """Byte-level BPE over corpus/*.txt. All 256 byte symbols are in the base alphabet, so any
    UTF-8 string encodes, and decode(encode(s)) == s (no normalizer, no added prefix space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt"))]
    if not texts:
        raise FileNotFoundError(f"no corpus files in {CORPUS_DIR}")
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _hf_config(
    arch: str, vocab_size: int, bos_id: int, eos_id: int, sizes: dict[str, int] | None = None
) -> dict[str, Any]:
    architecture, model_type = ARCHITECTURES[arch]
    z = SIZE_DEFAULTS | (sizes or {})
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": z["hidden_size"],
        "num_hidden_layers": z["num_layers"],
        "num_attention_heads": z["num_heads"],
        "num_key_value_heads": z["num_kv_heads"],
        "head_dim": z["hidden_size"] // z["num_heads"],
        "intermediate_size": z["intermediate_size"],
        "hidden_act": "silu",
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "rope_scaling": None,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "llama":
        config |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    elif arch.startswith("deepseek"):
        v3 = arch == "deepseek_v3"
        config |= {
            "num_hidden_layers": DEEPSEEK_NUM_LAYERS,
            "num_key_value_heads": NUM_HEADS,
            "head_dim": DEEPSEEK_MLA["qk_rope_head_dim"],
            "q_lora_rank": DEEPSEEK_Q_LORA_RANK[arch],
            **DEEPSEEK_MLA,
            **DEEPSEEK_MOE,
            "attention_bias": False,
            "mlp_bias": False,
            "routed_scaling_factor": 2.5 if v3 else 1.0,
            "norm_topk_prob": v3,
            "topk_method": "noaux_tc" if v3 else "group_limited_greedy",
            "scoring_func": "sigmoid" if v3 else "softmax",
        }
        if v3:
            config["rope_interleave"] = True
    else:
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": z["num_layers"]}
    return config


def random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 weights, drawn from one generator in a fixed order.

    Projections get std 1/sqrt(fan_in) so activations stay O(1) through the layers; the LM head is
    scaled so logits have std ~3: greedy argmaxes are then far apart relative to float32 noise,
    and batched-vs-alone comparisons do not flip on near-ties.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    if config["architectures"][0].startswith("Deepseek"):
        return _deepseek_weights(config, g)
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    q_dim, kv_dim = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    bias = config["architectures"][0] == "Qwen2ForCausalLM"

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).contiguous()

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(q_dim, h, std=1 / math.sqrt(h))
        w[p + "self_attn.k_proj.weight"] = normal(kv_dim, h, std=1 / math.sqrt(h))
        w[p + "self_attn.v_proj.weight"] = normal(kv_dim, h, std=1 / math.sqrt(h))
        w[p + "self_attn.o_proj.weight"] = normal(h, q_dim, std=1 / math.sqrt(q_dim))
        if bias:
            w[p + "self_attn.q_proj.bias"] = normal(q_dim, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(kv_dim, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(kv_dim, std=0.1)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        w[p + "mlp.up_proj.weight"] = normal(inter, h, std=1 / math.sqrt(h))
        w[p + "mlp.down_proj.weight"] = normal(h, inter, std=1 / math.sqrt(inter))
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = normal(vocab, h, std=3.0 / math.sqrt(h))
    return w


def _deepseek_weights(config: dict[str, Any], g: torch.Generator) -> dict[str, torch.Tensor]:
    """HF-named DeepSeek weights (experts one module each, as DeepSeek's checkpoints store them)."""
    import torch

    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, q_lora, kv_lora = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    experts, moe_inter = config["n_routed_experts"], config["moe_intermediate_size"]
    shared_inter = moe_inter * config["n_shared_experts"]

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).contiguous()

    def mlp(prefix: str, width: int) -> None:
        w[prefix + "gate_proj.weight"] = normal(width, h, std=1 / math.sqrt(h))
        w[prefix + "up_proj.weight"] = normal(width, h, std=1 / math.sqrt(h))
        w[prefix + "down_proj.weight"] = normal(h, width, std=1 / math.sqrt(width))

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if q_lora is None:
            w[a + "q_proj.weight"] = normal(heads * (nope + rope), h, std=1 / math.sqrt(h))
        else:
            w[a + "q_a_proj.weight"] = normal(q_lora, h, std=1 / math.sqrt(h))
            w[a + "q_a_layernorm.weight"] = 1 + normal(q_lora, std=0.1)
            w[a + "q_b_proj.weight"] = normal(heads * (nope + rope), q_lora, std=1 / math.sqrt(q_lora))
        w[a + "kv_a_proj_with_mqa.weight"] = normal(kv_lora + rope, h, std=1 / math.sqrt(h))
        w[a + "kv_a_layernorm.weight"] = 1 + normal(kv_lora, std=0.1)
        w[a + "kv_b_proj.weight"] = normal(heads * (nope + v), kv_lora, std=1 / math.sqrt(kv_lora))
        w[a + "o_proj.weight"] = normal(h, heads * v, std=1 / math.sqrt(heads * v))
        if i < config["first_k_dense_replace"]:
            mlp(p + "mlp.", inter)
        else:
            w[p + "mlp.gate.weight"] = normal(experts, h, std=1 / math.sqrt(h))
            if config["architectures"][0] == "DeepseekV3ForCausalLM":
                w[p + "mlp.gate.e_score_correction_bias"] = normal(experts, std=0.1)
            for e in range(experts):
                mlp(p + f"mlp.experts.{e}.", moe_inter)
            mlp(p + "mlp.shared_experts.", shared_inter)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = normal(vocab, h, std=3.0 / math.sqrt(h))
    return w


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Create dpserve's tiny random checkpoint.")
    ap.add_argument("dir", nargs="?", default=None, help=f"output dir (default {default_model_dir()})")
    ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = create_tiny_model(args.dir if args.dir is not None else default_model_dir(), args.arch, args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
