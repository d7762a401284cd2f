"""The models on the Triton path (`--attention-backend triton`) against the same weights on the torch
path: tiny Llama (paged GQA attention, fused add+RMSNorm, rotary) and tiny DeepSeek V2 / V3 (MLA
decode and extend over the latent pool, grouped-GEMM MoE, interleaved and YaRN rotary), over
prefill, mixed prefill+decode and pure decode steps. On the CPU the kernels run under Triton's
interpreter (tests/unit/kernel_checks.py), so every kernel the scheduler uses on a GPU is executed
here, inside the real model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from services.launcher.tiny_model import create_tiny_model
from services.scheduler.model import ModelConfig, build_forward_batch, load_model
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.model.mla_pool import make_kv_pool
from tests.unit.kernel_checks import DEVICE, load_kernel_module

for _name in ("decode_attention", "extend_attention", "mla_decode", "moe", "rmsnorm", "rotary"):
    load_kernel_module(f"services.scheduler.kernels.{_name}")
from services.scheduler.model.attention_backends import (  # noqa: E402  (after the interpreter is set)
    TritonAttentionBackend,
    TritonMLABackend,
    install_attention_backend,
)
from services.scheduler.model.layers import RMSNorm  # noqa: E402
from services.scheduler.model.moe import DeepseekMoE  # noqa: E402

EMPTY = torch.empty(0, dtype=torch.long)
# float32 on both paths; the kernels sum in another order (split-K, online softmax, blocked GEMMs).
ATOL = 2e-4


def _slots(pool: KVPool, n: int, g: torch.Generator) -> torch.Tensor:
    s = pool.alloc(n)
    assert s is not None
    return s[torch.randperm(n, generator=g)]  # a request's KV is scattered over the pool


def _run_steps(model: torch.nn.Module, config: ModelConfig) -> list[torch.Tensor]:
    """Logits of: a prefill of two prompts; a mixed step (a decode, a chunk over a cached prefix,
    a fresh prompt); a pure decode step of all three."""
    g = torch.Generator().manual_seed(0)
    pool = make_kv_pool(config, 256, device=DEVICE)
    v = config.vocab_size
    a, b = _slots(pool, 9, g), _slots(pool, 20, g)
    out = []
    with torch.inference_mode():
        out.append(model(build_forward_batch([list(range(5, 14)), list(range(30, 50))], [EMPTY, EMPTY], [a, b], pool)))
        a2, b2, c = _slots(pool, 1, g), _slots(pool, 3, g), _slots(pool, 7, g)
        fresh = torch.randint(4, v, (7,), generator=g).tolist()
        out.append(model(build_forward_batch([[77], [1, 2, 3], fresh], [a, b, EMPTY], [a2, b2, c], pool)))
        a3, b3, c3 = _slots(pool, 1, g), _slots(pool, 1, g), _slots(pool, 1, g)
        prefixes = [torch.cat([a, a2]), torch.cat([b, b2]), c]
        out.append(model(build_forward_batch([[8], [9], [10]], prefixes, [a3, b3, c3], pool)))
    return out


def _compare(model_dir: Path, expect_backend: type) -> torch.nn.Module:
    reference, config = load_model(model_dir, device=DEVICE)
    want = _run_steps(reference, config)
    model, _ = load_model(model_dir, device=DEVICE)
    chosen = install_attention_backend(model, "triton", DEVICE)
    assert chosen.startswith("triton") and isinstance(model.attn_backend, expect_backend), chosen
    got = _run_steps(model, config)
    for step, (w, o) in enumerate(zip(want, got, strict=True)):
        assert not torch.isnan(o).any()
        assert w.argmax(-1).tolist() == o.argmax(-1).tolist(), f"step {step}: greedy tokens differ"
        torch.testing.assert_close(o, w, atol=ATOL, rtol=0, msg=f"step {step}")
    return model


def _every_rmsnorm_fused(model: torch.nn.Module) -> None:
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m._fused is not None for m in norms)


def test_llama_on_the_triton_path_matches_torch(tiny_model: Path) -> None:
    model = _compare(tiny_model, TritonAttentionBackend)
    _every_rmsnorm_fused(model)
    assert model.model.rotary_emb._kernel is not None


@pytest.fixture(scope="module", params=["deepseek_v3", "deepseek_v2"])
def deepseek_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp(request.param) / "model", arch=request.param)


def test_deepseek_on_the_triton_path_matches_torch(deepseek_dir: Path) -> None:
    model = _compare(deepseek_dir, TritonMLABackend)
    _every_rmsnorm_fused(model)
    assert model.model.rotary_emb._kernel is not None
    moes = [m for m in model.modules() if isinstance(m, DeepseekMoE)]
    assert moes and all(m._fused is not None for m in moes)
    # the experts' parameters now live inside the stacked kernel weights: no second copy
    for moe in moes:
        assert moe.w13 is not None and moe.w2 is not None
        first = moe.experts["0"]
        assert first.gate_proj.weight.data_ptr() == moe.w13.data_ptr()
        assert first.down_proj.weight.data_ptr() == moe.w2.data_ptr()


def test_deepseek_yarn_on_the_triton_path_matches_torch(tmp_path: Path) -> None:
    """YaRN's attention factor scales the rotated q and k on the kernel path too; prompts run
    past original_max_position_embeddings."""
    d = create_tiny_model(tmp_path / "v3", arch="deepseek_v3")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {
        "type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    model = _compare(d, TritonMLABackend)
    assert model.model.rotary_emb.attention_factor != 1.0


@pytest.mark.parametrize("experts", [range(0, 3), range(3, 6), range(6, 8)], ids=str)
def test_an_expert_parallel_moe_slice_matches_torch(deepseek_dir: Path, experts: range) -> None:
    """An EP rank's DeepseekMoE (a slice of the routed experts, no reduce) on both paths."""
    config = ModelConfig.from_hf(deepseek_dir)
    full, _ = load_model(deepseek_dir, device=DEVICE)
    weights = {k: v for k, v in full.model.layers[1].mlp.state_dict().items()}

    def build(switch: Callable[[DeepseekMoE], None]) -> DeepseekMoE:
        moe = DeepseekMoE(config, expert_ids=experts).to(DEVICE)
        moe.load_state_dict({k: v for k, v in weights.items() if not k.startswith("experts.")
                             or int(k.split(".")[1]) in experts})
        switch(moe)
        return moe

    x = torch.randn(13, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.inference_mode():
        want = build(lambda m: None)(x)
        got = build(DeepseekMoE.use_triton)(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_norm_threads_the_residual_like_the_torch_norm() -> None:
    torch_norm, fused = RMSNorm(24, 1e-6).to(DEVICE), RMSNorm(24, 1e-6).to(DEVICE)
    with torch.no_grad():
        torch_norm.weight.uniform_(0.5, 1.5)
        fused.weight.copy_(torch_norm.weight)
    fused.use_triton()
    g = torch.Generator().manual_seed(2)
    x, res = torch.randn(5, 24, generator=g).to(DEVICE), torch.randn(5, 24, generator=g).to(DEVICE)
    torch.testing.assert_close(fused(x), torch_norm(x))
    (n1, r1), (n2, r2) = fused(x, res), torch_norm(x, res)
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(r1, r2)
    torch.testing.assert_close(r2, x + res)
    empty = torch.empty(0, 24, device=DEVICE)
    assert fused(empty, empty)[0].shape == (0, 24)  # an idle DP-attention batch


def test_torch_and_auto_on_the_cpu_leave_the_model_alone(tiny_model: Path) -> None:
    model, _ = load_model(tiny_model, device="cpu")
    before = model.attn_backend
    assert install_attention_backend(model, "auto", "cpu") == "torch"
    assert install_attention_backend(model, "torch", "cpu") == "torch"
    assert model.attn_backend is before
    assert all(m._fused is None for m in model.modules() if isinstance(m, RMSNorm))


def test_the_gpu_benchmark_end_to_end_part_runs_on_both_paths() -> None:
    """benchmarks/bench_kernels.py's e2e decode (V2-Lite's layout, shrunk) on the CPU: the code
    the GPU run will take, on the torch and the Triton path."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = bench.V2_LITE | {
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16, "head_dim": 8,
    }
    for backend in ("torch", "triton"):
        rows = bench.e2e_decode(small, torch.float32, "cpu", backend, (1, 3), ctx=5, steps=2)
        assert [(r[0], r[1], r[2], r[3]) for r in rows] == [(backend, 2, 1, 5), (backend, 2, 3, 5)]
        assert all(r[4] > 0 and r[5] > 0 for r in rows)
    capacity = bench.dp_attention_capacity(small, torch.bfloat16, 2, kv_gib_per_rank=1.0)
    per_token = 2 * (32 + 8) * 2  # layers x (latent + rope) x bf16
    assert capacity == [("tp 2", 2**30 // per_token), ("tp 2 dp 2 DP attention", 2 * (2**30 // per_token))]
