"""Our model against transformers on the tiny checkpoint: prefill, mixed batches, greedy decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from services.launcher.tiny_model import create_tiny_model
from services.scheduler.model import KVPool, ModelConfig, build_forward_batch, load_model
from services.scheduler.model.config import RopeScaling
from services.scheduler.model.layers import rope_inv_freq
from services.scheduler.model.registry import get_model_class

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
EMPTY = torch.empty(0, dtype=torch.long)


@dataclass
class Models:
    dir: Path
    ours: torch.nn.Module
    config: ModelConfig
    hf: torch.nn.Module


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = create_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param, seed=0)
    ours, config = load_model(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return Models(d, ours, config, hf)


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()  # no special tokens


@torch.inference_mode()
def hf_last_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0, -1].float()


def new_pool(config: ModelConfig, size: int = 512) -> KVPool:
    return KVPool(config.num_hidden_layers, size, config.num_key_value_heads, config.head_dim)


def scattered_alloc(pool: KVPool, n: int, g: torch.Generator) -> torch.Tensor:
    """n slots in a shuffled order, so a request's KV is not contiguous in the pool."""
    s = pool.alloc(n)
    assert s is not None
    return s[torch.randperm(n, generator=g)]


def test_config(models: Models) -> None:
    c = models.config
    assert c.architecture in ("LlamaForCausalLM", "Qwen2ForCausalLM")
    assert c.attention_bias == (c.architecture == "Qwen2ForCausalLM")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert c.head_dim == 16 and c.vocab_size == 1000 and not c.tie_word_embeddings
    assert c.eos_token_ids == (1, 3)  # config's <|end_of_text|> then generation_config's <|im_end|>


@pytest.mark.parametrize("n", [1, 2, 7, 33, 100])
def test_prefill_logits(models: Models, n: int) -> None:
    ids = prompt(n, seed=n, vocab=models.config.vocab_size)
    pool = new_pool(models.config)
    batch = build_forward_batch([ids], [EMPTY], [pool.alloc(n)], pool)
    batch.validate()
    with torch.inference_mode():
        ours = models.ours(batch)
    assert ours.shape == (1, models.config.vocab_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], hf_last_logits(models.hf, ids), atol=ATOL, rtol=0)


def test_mixed_batch(models: Models) -> None:
    """One step holding two decode requests, a fresh prefill, and a chunked prefill over a cached
    prefix; all prior KV was written by earlier steps into scattered pool slots."""
    v = models.config.vocab_size
    g = torch.Generator().manual_seed(0)
    pool = new_pool(models.config)
    dec_a, dec_b = prompt(9, 1, v), prompt(20, 2, v)
    chunk = prompt(15, 3, v)  # first 6 tokens cached by an earlier step, 9 extended now
    fresh = prompt(12, 4, v)

    # Earlier step: prefill the decode requests' prompts (but their last token) and chunk[:6].
    earlier = [dec_a[:-1], dec_b[:-1], chunk[:6]]
    slots = [scattered_alloc(pool, len(t), g) for t in earlier]
    with torch.inference_mode():
        models.ours(build_forward_batch(earlier, [EMPTY] * 3, slots, pool))

    # This step, in an order that interleaves the kinds.
    new_tokens = [dec_a[-1:], fresh, dec_b[-1:], chunk[6:]]
    prefixes = [slots[0], EMPTY, slots[1], slots[2]]
    new_slots = [scattered_alloc(pool, len(t), g) for t in new_tokens]
    batch = build_forward_batch(new_tokens, prefixes, new_slots, pool)
    batch.validate()
    assert batch.extend_lens == [1, 12, 1, 9] and batch.seq_lens == [9, 12, 20, 15]
    with torch.inference_mode():
        ours = models.ours(batch)
    for i, full in enumerate([dec_a, fresh, dec_b, chunk]):
        torch.testing.assert_close(ours[i], hf_last_logits(models.hf, full), atol=ATOL, rtol=0)


@dataclass
class Req:
    ids: list[int]
    start_step: int
    slots: torch.Tensor = field(default_factory=lambda: EMPTY)
    out: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens not yet in the KV


def test_greedy_generation(models: Models) -> None:
    """Three requests decode together, one joining late as a prefill while the others decode;
    each must produce exactly what transformers' generate gives it alone."""
    max_new, v, cfg = 16, models.config.vocab_size, models.config
    reqs = [Req(prompt(5, 10, v), 0), Req(prompt(23, 11, v), 0), Req(prompt(11, 12, v), 3)]
    pool = new_pool(cfg)
    step = 0
    while any(len(r.out) < max_new for r in reqs):
        live = [r for r in reqs if r.start_step <= step and len(r.out) < max_new]
        for r in live:
            if not r.out and not r.pending:
                r.pending = list(r.ids)
        new_slots = [pool.alloc(len(r.pending)) for r in live]
        batch = build_forward_batch([r.pending for r in live], [r.slots for r in live], new_slots, pool)
        with torch.inference_mode():
            logits = models.ours(batch)
        for r, s, tok in zip(live, new_slots, logits.argmax(-1).tolist(), strict=True):
            r.slots = torch.cat([r.slots, s])
            r.out.append(tok)
            r.pending = [tok]
            if tok in cfg.eos_token_ids:
                r.out += [-1] * (max_new - len(r.out))  # finished; HF stops here too
        step += 1
    for r in reqs:
        pool.free(r.slots)
    assert pool.num_free == pool.size

    for r in reqs:
        with torch.inference_mode():
            ref = models.hf.generate(
                torch.tensor([r.ids]),
                attention_mask=torch.ones(1, len(r.ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=1,
            )[0, len(r.ids) :].tolist()
        ours = [t for t in r.out if t != -1]
        assert ours == ref


def test_hf_tokenizer_and_chat_template(models: Models) -> None:
    from tokenizers import Tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(models.dir)
    raw = Tokenizer.from_file(str(models.dir / "tokenizer.json"))
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo 🙂"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhéllo 🙂<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert ids == raw.encode(text).ids  # no BOS/EOS added; same BPE as the raw tokenizer
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text


def test_llama3_rope_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(64, 500000.0, RopeScaling.from_hf(scaling))
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)


def test_bad_config_and_checkpoint(models: Models, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")

    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(models.dir, bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights.pop("model.norm.weight")
    weights["model.extra.weight"] = torch.zeros(2)
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"missing \['model.norm.weight'\].*unexpected \['model.extra.weight'\]"
    ):
        load_model(bad)
