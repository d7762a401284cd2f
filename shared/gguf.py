"""convert_gguf: a Llama-family GGUF file -> a Hugging Face checkpoint directory our loader reads.

Torch-free (numpy, llama.cpp's `gguf` reader, safetensors.numpy, tokenizers), so the tokenizer and
detokenizer processes can convert too. The directory holds config.json, generation_config.json,
model.safetensors (every tensor dequantized to float32: the converted model computes exactly what
transformers computes from the same file), tokenizer.json and tokenizer_config.json (built by
`shared.gguf_tokenizer`), and for
Q4_1 / Q8_0 weights their raw blocks (BLOCKS_FILE) for the CPU's small-batch kernels.

Three things llama.cpp's converter changed that we undo:
  - names: `blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight` (NAMES below);
  - shapes: GGUF lists dimensions innermost first (ggml's `ne`), the reader already reverses them
    into numpy order, which is HF's [out_features, in_features];
  - q / k rows: llama.cpp permutes each head's rows from HF's rotate-half rotary layout (pairs
    (i, i + d/2)) to GPT-J's interleaved one (pairs (2i, 2i+1)); `_unpermute` reverses it.

Every failure to read a file (not GGUF, truncated, unsupported quant type or architecture) is a
ValueError that names the file and, where it applies, the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from shared.gguf_tokenizer import build_tokenizer

SUPPORTED_ARCHITECTURES = ("llama",)

# Weights in these types also keep their raw GGUF blocks (BLOCKS_FILE: name -> uint8 [rows, row
# bytes], the type in the metadata): the CPU decode kernels (services/scheduler/cpu) read them
# instead of float32 where a step has few rows. They decode to exactly the float32 weights.
BLOCK_TYPES = ("Q4_1", "Q8_0")
BLOCKS_FILE = "gguf_blocks/blocks.safetensors"  # in a subdirectory: loaders that take every top-level *.safetensors (ours, vLLM) skip it

# GGUF tensor name (after `blk.N.`) -> HF module name (after `model.layers.N.`)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the HF checkpoint of `gguf_path` into `out_dir` (created; existing files replaced)."""
    from gguf import GGUFReader

    path = Path(gguf_path)
    out = Path(out_dir)
    try:
        reader = GGUFReader(str(path))
    except OSError:
        raise
    except Exception as e:  # the reader raises whatever numpy / struct raise on a bad file
        raise ValueError(f"{path}: not a GGUF file, or truncated or corrupt ({type(e).__name__}: {e})") from e
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    config = _config(meta, reader, path)
    tokenizer, tokenizer_config = build_tokenizer(meta, path)
    tensors, blocks = _tensors(reader, config, path)
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if blocks:
        (out / BLOCKS_FILE).parent.mkdir(exist_ok=True)
        save_file({name: data for name, (_, data) in blocks.items()}, str(out / BLOCKS_FILE),
                  metadata={name: qtype for name, (qtype, _) in blocks.items()})
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    _write_json(out / "generation_config.json", generation)
    return out


def model_name(gguf_path: str | Path) -> str:
    """The name to serve a GGUF file under: its file name without `.gguf` and a quant suffix
    (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`)."""
    stem = Path(gguf_path).name.removesuffix(".gguf")
    return re.sub(r"[.-](I?Q\d\w*|[BF]F?16|F32)$", "", stem, flags=re.IGNORECASE) or stem


# --- metadata ---------------------------------------------------------------------------------


class _Metadata:
    """Typed access to the key/value fields; a missing or malformed field is a ValueError."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields = reader.fields
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise ValueError(f"{self.path}: metadata field {key!r} is malformed ({e})") from e

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: metadata field {key!r} is missing")
        return value


def _config(meta: _Metadata, reader: Any, path: Path) -> dict[str, Any]:
    arch = meta.require("general.architecture")
    heads = int(meta.require(f"{arch}.attention.head_count"))
    hidden = int(meta.require(f"{arch}.embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "bfloat16",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        factor = float(meta.require(f"{arch}.rope.scaling.factor"))
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        else:
            raise ValueError(f"{path}: rope scaling {scaling!r} is not supported (only linear)")
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    return config


# --- tensors ----------------------------------------------------------------------------------


def _hf_name(name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in TOP_NAMES:
        return f"{TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _tensors(
    reader: Any, config: dict[str, Any], path: Path
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, np.ndarray]]]:
    """(every tensor dequantized to float32, the raw blocks [rows, row bytes] of the weights kept
    in a type the CPU kernels read: name -> (type name, blocks))."""
    from gguf import GGMLQuantizationType
    from gguf.quants import _type_traits, dequantize

    supported = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    blocks: dict[str, tuple[str, np.ndarray]] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            _check_rope_freqs(t, path)
            continue
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{path}: tensor {t.name!r} has no Hugging Face Llama counterpart")
        qtype = t.tensor_type
        if qtype not in supported:
            raise ValueError(f"{path}: tensor {t.name!r} has quantization type {qtype.name}, which cannot be dequantized")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml's ne is innermost first
        try:
            w = np.ascontiguousarray(dequantize(t.data, qtype), dtype=np.float32).reshape(shape)
        except Exception as e:
            raise ValueError(f"{path}: tensor {t.name!r} ({qtype.name}, shape {shape}) is corrupt ({e})") from e
        raw = t.data if qtype.name in BLOCK_TYPES and len(shape) == 2 and t.data.ndim == 2 else None
        if ".attn_q." in t.name:
            w = _unpermute(w, heads)
            raw = None if raw is None else _unpermute(raw, heads)
        elif ".attn_k." in t.name:
            w = _unpermute(w, kv_heads)
            raw = None if raw is None else _unpermute(raw, kv_heads)
        out[name] = np.ascontiguousarray(w)
        if raw is not None:
            blocks[name] = (qtype.name, np.ascontiguousarray(raw, dtype=np.uint8))
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - set(out)
    if missing:
        raise ValueError(f"{path}: tensors {sorted(missing)} are missing")
    return out, blocks


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head row permutation of q / k: in each head's rows, GGUF row 2i + j
    holds HF row j * (d/2) + i (j in {0, 1})."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"q/k rows {rows} do not split into {n_head} heads of an even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_rope_freqs(t: Any, path: Path) -> None:
    """llama.cpp stores Llama 3.1's rope scaling as per-frequency factors; ones mean none."""
    factors = np.asarray(t.data, dtype=np.float32)
    if not np.allclose(factors, 1.0):
        raise ValueError(f"{path}: rope_freqs (Llama 3.1-style rope scaling) is not supported")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
