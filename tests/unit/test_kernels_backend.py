"""TritonAttentionBackend inside the real model (tiny llama) vs the torch backend, and selection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.scheduler.model import KVPool, ModelConfig, build_forward_batch, load_model
from services.scheduler.model.attention import TorchAttentionBackend
from tests.unit.kernel_checks import DEVICE, load_kernel_module

load_kernel_module("services.scheduler.kernels.decode_attention")
load_kernel_module("services.scheduler.kernels.extend_attention")
from services.scheduler.model.attention_backends import (  # noqa: E402  (after the interpreter is set)
    AttentionBackend,
    TritonAttentionBackend,
    resolve_attention_backend,
    select_attention_backend,
)
from shared.config import ServerArgs  # noqa: E402

EMPTY = torch.empty(0, dtype=torch.long)


def _slots(pool: KVPool, n: int, g: torch.Generator) -> torch.Tensor:
    s = pool.alloc(n)
    assert s is not None
    return s[torch.randperm(n, generator=g)]  # a request's KV is scattered over the pool


def _run_steps(model: torch.nn.Module, config: ModelConfig, backend: AttentionBackend) -> list[torch.Tensor]:
    """Prefill two prompts, a mixed step (one decode + one prefill over a cached prefix), a decode."""
    model.attn_backend = backend
    g = torch.Generator().manual_seed(0)
    pool = KVPool(config.num_hidden_layers, 256, config.num_key_value_heads, config.head_dim, device=DEVICE)
    a, b = _slots(pool, 9, g), _slots(pool, 20, g)
    logits = []
    with torch.inference_mode():
        logits.append(model(build_forward_batch([list(range(5, 14)), list(range(30, 50))], [EMPTY, EMPTY], [a, b], pool)))
        a2, b2 = _slots(pool, 1, g), _slots(pool, 3, g)
        logits.append(model(build_forward_batch([[77], [1, 2, 3]], [a, b], [a2, b2], pool)))
        a3, b3 = _slots(pool, 1, g), _slots(pool, 1, g)
        prefix_a, prefix_b = torch.cat([a, a2]), torch.cat([b, b2])
        logits.append(model(build_forward_batch([[8], [9]], [prefix_a, prefix_b], [a3, b3], pool)))
    return logits


def test_triton_backend_matches_torch_backend_in_the_model(tiny_model: Path) -> None:
    model, config = load_model(tiny_model, device=DEVICE)
    want = _run_steps(model, config, TorchAttentionBackend())
    got = _run_steps(model, config, TritonAttentionBackend(num_kv_splits=4))
    for step, (w, o) in enumerate(zip(want, got, strict=True)):
        assert not torch.isnan(o).any()
        torch.testing.assert_close(o, w, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_resolve_backend() -> None:
    assert resolve_attention_backend("auto", "cuda") == "triton"
    assert resolve_attention_backend("auto", "cpu") == "torch"
    assert resolve_attention_backend("torch", "cuda:0") == "torch"
    assert resolve_attention_backend("triton", "cuda") == "triton"
    with pytest.raises(ValueError, match="unknown --attention-backend"):
        resolve_attention_backend("flashinfer", "cuda")
    assert isinstance(select_attention_backend("auto", "cpu"), TorchAttentionBackend)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_attention_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(select_attention_backend("triton", "cpu"), TritonAttentionBackend)


def test_server_flag() -> None:
    assert ServerArgs.parse([]).attention_backend == "auto"
    assert ServerArgs.parse(["--attention-backend", "triton"]).attention_backend == "triton"
    with pytest.raises(SystemExit):
        ServerArgs.parse(["--attention-backend", "nope"])
    with pytest.raises(ValueError, match="attention-backend"):
        ServerArgs(attention_backend="nope").validate()
