"""create_tiny_model: determinism, atomic layout, byte-level tokenizer round trips."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from services.launcher import tiny_model
from services.launcher.tiny_model import create_tiny_model, default_model_dir, ensure_tiny_model

FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_layout(model_dir: Path) -> None:
    for f in FILES:
        assert (model_dir / f).is_file(), f
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == tok.get_vocab_size() == 1000
    assert cfg["bos_token_id"] == tok.token_to_id("<|begin_of_text|>")
    assert cfg["eos_token_id"] == tok.token_to_id("<|end_of_text|>")
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert tok.token_to_id("<|im_end|>") in gen["eos_token_id"]


def test_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = create_tiny_model(tmp_path / "again", seed=0)
    for f in FILES:
        assert (model_dir / f).read_bytes() == (again / f).read_bytes(), f
    other = create_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_create_replaces_and_ensure_keeps(tmp_path: Path) -> None:
    d = create_tiny_model(tmp_path / "m", arch="qwen2", seed=3)
    assert json.loads((d / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    before = (d / "model.safetensors").read_bytes()
    assert ensure_tiny_model(d) == d  # complete: left alone
    assert (d / "model.safetensors").read_bytes() == before
    create_tiny_model(d, arch="llama", seed=0)  # explicit create replaces it
    assert json.loads((d / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(ValueError):
        create_tiny_model(tmp_path / "x", arch="gpt2")


def test_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DPSERVE_CACHE_DIR", str(tmp_path))
    assert default_model_dir() == tmp_path / "tiny-llama"
    assert ensure_tiny_model() == tmp_path / "tiny-llama"
    assert (tmp_path / "tiny-llama" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld — Ελληνικά 中文 日本語 🙂",
        "The lighthouse keeper kept a ledger.",
        "  leading and trailing spaces, tabs\tand\nnewlines\r\n ",
        "never seen: Ǆ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👨‍👩‍👧 \x00\x7f",
        "<|im_start|>user\nhi<|im_end|>\n",
    ],
)
def test_tokenizer_round_trip(model_dir: Path, text: str) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_every_byte_is_a_token(model_dir: Path) -> None:
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    for ch in tiny_model.pre_tokenizers.ByteLevel.alphabet():
        assert ch in vocab
    special = {tok.token_to_id(t) for t in tiny_model.SPECIAL_TOKENS}
    assert special == {0, 1, 2, 3}
    assert tok.encode("<|im_start|>").ids == [tok.token_to_id("<|im_start|>")]
