"""DeepSeek V2/V3 (MLA + MoE) against transformers on tiny checkpoints: prefill, a mixed
prefill+decode batch over the latent pool, greedy generation, YaRN, routing, pool size."""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from services.launcher.tiny_model import create_tiny_model
from services.scheduler.model import ModelConfig, build_forward_batch, load_model
from services.scheduler.model.config import RopeScaling
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.model.mla import deepseek_inv_freq
from services.scheduler.model.mla_pool import MLAKVPool, kv_bytes_per_token, make_kv_pool

transformers = pytest.importorskip("transformers")

# Logits have std ~3; the absorbed (latent-space) attention sums in another order than HF's.
ATOL = 5e-4
EMPTY = torch.empty(0, dtype=torch.long)


@dataclass
class Models:
    dir: Path
    ours: torch.nn.Module
    config: ModelConfig
    hf: torch.nn.Module


def load_both(d: Path) -> Models:
    ours, config = load_model(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return Models(d, ours, config, hf)


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Models:
    return load_both(create_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param))


def prompt(n: int, seed: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def hf_last_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0, -1].float()


def scattered_alloc(pool: KVPool, n: int, g: torch.Generator) -> torch.Tensor:
    s = pool.alloc(n)
    assert s is not None
    return s[torch.randperm(n, generator=g)]


def test_config_and_checkpoint_layout(models: Models) -> None:
    c = models.config
    assert c.mla is not None and c.moe is not None
    v3 = c.architecture == "DeepseekV3ForCausalLM"
    assert c.mla.q_lora_rank == (48 if v3 else None)
    assert (c.mla.kv_lora_rank, c.mla.qk_rope_head_dim, c.mla.kv_cache_dim) == (32, 8, 40)
    assert [c.moe.is_moe_layer(i) for i in range(c.num_hidden_layers)] == [False, True, True]
    assert (c.moe.scoring_func, c.moe.topk_method) == (
        ("sigmoid", "noaux_tc") if v3 else ("softmax", "group_limited_greedy")
    )
    # transformers read the same tensors we did (its fused experts = our per-expert modules).
    hf_moe, ours_moe = models.hf.model.layers[1].mlp, models.ours.model.layers[1].mlp
    torch.testing.assert_close(hf_moe.gate.weight, ours_moe.gate.weight, atol=0, rtol=0)
    gate_up = torch.cat([ours_moe.experts["5"].gate_proj.weight, ours_moe.experts["5"].up_proj.weight])
    torch.testing.assert_close(hf_moe.experts.gate_up_proj[5], gate_up, atol=0, rtol=0)
    if v3:
        torch.testing.assert_close(
            hf_moe.gate.e_score_correction_bias, ours_moe.gate.e_score_correction_bias, atol=0, rtol=0
        )
        assert float(ours_moe.gate.e_score_correction_bias.abs().max()) > 0.05  # the bias matters


def test_pool_holds_one_latent_per_token_per_layer(models: Models) -> None:
    c = models.config
    assert c.mla is not None
    for dtype in (torch.float32, torch.bfloat16):
        pool = make_kv_pool(c, 64, dtype)
        assert isinstance(pool, MLAKVPool)
        expect = c.num_hidden_layers * (c.mla.kv_lora_rank + c.mla.qk_rope_head_dim) * dtype.itemsize
        assert pool.bytes_per_token == kv_bytes_per_token(c, dtype) == expect
        assert len(pool.kv) == c.num_hidden_layers and pool.kv[0].shape == (64, 1, 40)
        assert sum(t.numel() * t.element_size() for t in pool.kv) == 64 * expect  # nothing else allocated
        a = pool.alloc(10)
        assert a is not None and pool.num_free == 54
        pool.free(a)
        assert pool.num_free == 64
        pool.assert_invariants()
        with pytest.raises(ValueError, match="double free"):
            pool.free(a)


def test_llama_still_gets_kv_pool(tmp_path: Path) -> None:
    d = create_tiny_model(tmp_path / "llama", arch="llama")
    c = ModelConfig.from_hf(d)
    pool = make_kv_pool(c, 8)
    assert type(pool) is KVPool and c.mla is None and c.moe is None
    assert kv_bytes_per_token(c, torch.float32) == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("n", [1, 2, 7, 33, 100])
def test_prefill_logits(models: Models, n: int) -> None:
    ids = prompt(n, seed=n, vocab=models.config.vocab_size)
    pool = make_kv_pool(models.config, 256)
    batch = build_forward_batch([ids], [EMPTY], [pool.alloc(n)], pool)
    batch.validate()
    with torch.inference_mode():
        ours = models.ours(batch)
    assert ours.shape == (1, models.config.vocab_size) and ours.dtype == torch.float32
    torch.testing.assert_close(ours[0], hf_last_logits(models.hf, ids), atol=ATOL, rtol=0)


def test_mixed_batch(models: Models) -> None:
    """Two decodes, a fresh prefill and a chunked prefill over a cached prefix in one step; all
    earlier latents live in scattered slots of the pool."""
    v = models.config.vocab_size
    g = torch.Generator().manual_seed(0)
    pool = make_kv_pool(models.config, 256)
    dec_a, dec_b, chunk, fresh = prompt(9, 1, v), prompt(20, 2, v), prompt(15, 3, v), prompt(12, 4, v)
    earlier = [dec_a[:-1], dec_b[:-1], chunk[:6]]
    slots = [scattered_alloc(pool, len(t), g) for t in earlier]
    with torch.inference_mode():
        models.ours(build_forward_batch(earlier, [EMPTY] * 3, slots, pool))
    new_tokens = [dec_a[-1:], fresh, dec_b[-1:], chunk[6:]]
    prefixes = [slots[0], EMPTY, slots[1], slots[2]]
    new_slots = [scattered_alloc(pool, len(t), g) for t in new_tokens]
    batch = build_forward_batch(new_tokens, prefixes, new_slots, pool)
    batch.validate()
    with torch.inference_mode():
        ours = models.ours(batch)
    for i, full in enumerate([dec_a, fresh, dec_b, chunk]):
        torch.testing.assert_close(ours[i], hf_last_logits(models.hf, full), atol=ATOL, rtol=0)


def test_engine_style_call_gives_hidden_states(models: Models) -> None:
    """The engine picks rows itself: lm_head(model.norm(model.model(batch, model.attn_backend)))."""
    ids = prompt(12, seed=5, vocab=models.config.vocab_size)
    pool = make_kv_pool(models.config, 64)
    m = models.ours
    with torch.inference_mode():
        hidden = m.model(build_forward_batch([ids], [EMPTY], [pool.alloc(12)], pool), m.attn_backend)
        logits = m.lm_head(m.model.norm(hidden[[4, 11]])).float()
    torch.testing.assert_close(logits[0], hf_last_logits(models.hf, ids[:5]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], hf_last_logits(models.hf, ids), atol=ATOL, rtol=0)


def greedy(
    model: torch.nn.Module, config: ModelConfig, prompts: list[list[int]], max_new: int
) -> list[list[int]]:
    """Decode all prompts together over one pool (prefill together, then one token per step)."""
    pool = make_kv_pool(config, 256)
    slots = [pool.alloc(len(p)) for p in prompts]
    pending = [list(p) for p in prompts]
    prefixes = [EMPTY] * len(prompts)
    outs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new):
        with torch.inference_mode():
            logits = model(build_forward_batch(pending, prefixes, slots, pool))
        prefixes = [torch.cat([p, s]) for p, s in zip(prefixes, slots, strict=True)]
        toks = logits.argmax(-1).tolist()
        for o, t in zip(outs, toks, strict=True):
            o.append(t)
        pending = [[t] for t in toks]
        slots = [pool.alloc(1) for _ in prompts]
    for s in prefixes + slots:
        pool.free(s)
    assert pool.num_free == pool.size
    return outs


def test_greedy_generation(models: Models) -> None:
    v = models.config.vocab_size
    prompts = [prompt(5, 10, v), prompt(23, 11, v), prompt(11, 12, v)]
    ours = greedy(models.ours, models.config, prompts, 16)
    for p, o in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            ref = models.hf.generate(
                torch.tensor([p]),
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                pad_token_id=1,
            )[0, len(p) :].tolist()
        assert o == ref


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2"])
def test_yarn_rope_scaling(arch: str, tmp_path: Path) -> None:
    """YaRN with DeepSeek's mscale: prompts past original_max_position_embeddings match HF."""
    d = create_tiny_model(tmp_path / arch, arch=arch)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {
        "type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_both(d)
    s = m.config.rope_scaling
    assert s is not None and s.rope_type == "yarn" and s.mscale_all_dim == 1.0
    ref_rotary = m.hf.model.rotary_emb
    torch.testing.assert_close(
        m.ours.model.rotary_emb.inv_freq, ref_rotary.inv_freq.float(), atol=0, rtol=1e-6
    )
    assert m.ours.model.rotary_emb.attention_factor == pytest.approx(ref_rotary.attention_scaling)
    assert m.ours.model.layers[0].self_attn.scale == pytest.approx(m.hf.model.layers[0].self_attn.scaling)
    for n in (5, 60):
        ids = prompt(n, seed=n, vocab=m.config.vocab_size)
        pool = make_kv_pool(m.config, 128)
        with torch.inference_mode():
            ours = m.ours(build_forward_batch([ids], [EMPTY], [pool.alloc(n)], pool))
        torch.testing.assert_close(ours[0], hf_last_logits(m.hf, ids), atol=ATOL, rtol=0)


def test_routing_matches_hf_router(models: Models) -> None:
    """Our gate picks the same experts with the same weights as HF's router, for every method
    (greedy and the group-limited ones), on many tokens."""
    hf_gate, ours_gate = models.hf.model.layers[1].mlp.gate, models.ours.model.layers[1].mlp.gate
    x = torch.randn(512, models.config.hidden_size, generator=torch.Generator().manual_seed(3))
    methods = ["noaux_tc"] if models.config.moe.has_correction_bias else ["greedy", "group_limited_greedy"]
    hf_method = getattr(hf_gate, "topk_method", None)
    for method in methods:
        ours_gate.moe = dataclasses.replace(models.config.moe, topk_method=method)
        if hasattr(hf_gate, "topk_method"):
            hf_gate.topk_method = method
        with torch.inference_mode():
            w, ids = ours_gate(x)
            _, hw, hids = hf_gate(x)
        order, horder = ids.sort(-1), hids.sort(-1)
        assert torch.equal(order.values, horder.values), method
        torch.testing.assert_close(
            w.gather(1, order.indices), hw.gather(1, horder.indices), atol=1e-6, rtol=0
        )
    ours_gate.moe = models.config.moe
    if hf_method is not None:
        hf_gate.topk_method = hf_method


def test_bad_deepseek_config(models: Models, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(models.dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_scaling"] = {"type": "llama3", "factor": 8.0}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'llama3'; supported: default, yarn"):
        ModelConfig.from_hf(bad)
    cfg["rope_scaling"] = None
    cfg["topk_group"] = 3  # more groups than n_group=2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="topk_group"):
        ModelConfig.from_hf(bad)


def test_yarn_inv_freq_matches_transformers() -> None:
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "rope_theta": 10000.0,
    }
    hf_cfg = DeepseekV3Config(rope_parameters=scaling, qk_rope_head_dim=64, max_position_embeddings=163840)
    ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    ours = deepseek_inv_freq(64, 10000.0, RopeScaling.from_hf(scaling, allowed=("default", "yarn")))
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(1.0)
