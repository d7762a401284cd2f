"""The C kernels of the CPU path (services/scheduler/cpu) against the torch code they replace,
and the model on them against the model without them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.launcher.tiny_model import create_tiny_model
from services.scheduler import cpu
from services.scheduler.model import KVPool, build_forward_batch, load_model
from services.scheduler.model.attention import TorchAttentionBackend
from services.scheduler.model.parallel import CpuLinear
from shared.gguf import BLOCKS_FILE, convert_gguf
from tests.unit.test_gguf import write_gguf

pytestmark = pytest.mark.skipif(cpu.load_decode_attention() is None, reason="needs gcc and an AVX2/FMA/F16C CPU")


def test_decode_attention_matches_sdpa_over_scattered_slots() -> None:
    g = torch.Generator().manual_seed(0)
    for heads, kv_heads in [(9, 3), (4, 4), (8, 1)]:
        n, d = 2000, 64
        k, v = torch.randn(n, kv_heads, d, generator=g), torch.randn(n, kv_heads, d, generator=g)
        lens = [1, 7, 300, 64, 1000]
        perm = torch.randperm(n, generator=g)
        slots = [perm[sum(lens[:i]) : sum(lens[: i + 1])] for i in range(len(lens))]
        q = torch.randn(len(lens), heads, d, generator=g)
        indptr = torch.tensor([0] + lens).cumsum(0)
        out = cpu.decode_attention(q, k, v, indptr, torch.cat(slots), 0.125)
        for b, s in enumerate(slots):
            expected = F.scaled_dot_product_attention(
                q[b][:, None], k[s].transpose(0, 1), v[s].transpose(0, 1), scale=0.125, enable_gqa=True
            )[:, 0]
            torch.testing.assert_close(out[b], expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_refuses_what_it_cannot_read() -> None:
    q, kv = torch.randn(1, 2, 8), torch.randn(4, 2, 8)
    indptr, idx = torch.tensor([0, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="float32"):
        cpu.decode_attention(q.double(), kv, kv, indptr, idx, 1.0)
    with pytest.raises(ValueError, match="int64"):
        cpu.decode_attention(q, kv, kv, indptr.int(), idx, 1.0)


def test_torch_backend_same_with_and_without_the_kernel() -> None:
    """A mixed batch (two prefill chunks, three decodes of different lengths): the C decode path
    and the padded SDPA fallback give the same attention output."""
    g = torch.Generator().manual_seed(1)
    pool = KVPool(1, 256, 2, 16)
    pool.k[0].copy_(torch.randn(256, 2, 16, generator=g))
    pool.v[0].copy_(torch.randn(256, 2, 16, generator=g))
    prefixes = [pool.alloc(n) for n in (0, 5, 40, 3, 17)]
    new = [[1] * 6, [1], [1], [1] * 4, [1]]
    batch = build_forward_batch(new, prefixes, [pool.alloc(len(t)) for t in new], pool)  # type: ignore[arg-type]
    t = batch.num_tokens
    q, k, v = torch.randn(t, 6, 16, generator=g), torch.randn(t, 2, 16, generator=g), torch.randn(t, 2, 16, generator=g)
    with_kernel = TorchAttentionBackend()
    assert with_kernel._kernel is not None
    without = TorchAttentionBackend()
    without._kernel = None
    torch.testing.assert_close(with_kernel.forward(0, q, k, v, batch), without.forward(0, q, k, v, batch))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_gguf_linear_equals_the_dequantized_weight(qtype: str) -> None:
    kind = gguf.GGMLQuantizationType[qtype]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 160)).astype(np.float32)
    blocks = gguf.quants.quantize(w, kind)
    weight = torch.from_numpy(gguf.quants.dequantize(blocks, kind).reshape(w.shape).astype(np.float32))
    blocks_t = torch.from_numpy(np.ascontiguousarray(blocks))
    for rows in (1, 2, 5, 16, 31):  # every group size of the kernel (8, 4, 2, 1)
        x = torch.from_numpy(rng.standard_normal((rows, 160)).astype(np.float32))
        torch.testing.assert_close(cpu.gguf_linear(x, blocks_t, qtype), x @ weight.T, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        cpu.gguf_linear(torch.zeros(1, 128), blocks_t, qtype)


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_equals_linear(bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=bias).requires_grad_(False)
    blocks = gguf.quants.quantize(lin.weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    lin.weight.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0).reshape(96, 64)))
    for packed in (CpuLinear(lin), CpuLinear(lin, ("Q8_0", torch.from_numpy(np.ascontiguousarray(blocks))))):
        assert packed.weight is lin.weight
        for rows in (0, 1, 3, 8, 9, 32, 40):  # both sides of GGUF_ROWS
            x = torch.randn(rows, 64)
            torch.testing.assert_close(packed(x), lin(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(torch.randn(2, 3, 64)).shape, torch.Size([2, 3, 96]))


def test_model_on_gguf_blocks_decodes_as_on_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Q4_1 checkpoint: decode steps of a few rows run on the GGUF blocks, larger ones on the
    float32 weights; both give the logits the float32-only model gives."""
    tiny = create_tiny_model(tmp_path / "tiny", arch="llama", seed=0)
    d = convert_gguf(write_gguf(tiny, tmp_path / "tiny.Q4_1.gguf", gguf.GGMLQuantizationType.Q4_1), tmp_path / "hf")
    assert (d / BLOCKS_FILE).exists()
    on_blocks, config = load_model(d)
    layer = on_blocks.model.layers[0]
    assert layer.self_attn.qkv_proj.gguf_blocks[0] == "Q4_1"
    assert layer.mlp.gate_up_proj.gguf_blocks[0] == "Q4_1"
    monkeypatch.setattr(cpu, "load_gguf_linear", lambda: None)  # the same checkpoint, float32 only
    plain, _ = load_model(d)
    assert plain.model.layers[0].self_attn.qkv_proj.gguf_blocks is None

    def decode_logits(model: nn.Module, batch_size: int) -> torch.Tensor:
        pool = KVPool(config.num_hidden_layers, 1024, config.num_key_value_heads, config.head_dim)
        g = torch.Generator().manual_seed(batch_size)
        prompts = [torch.randint(4, config.vocab_size, (12,), generator=g).tolist() for _ in range(batch_size)]
        slots = [pool.alloc(12) for _ in prompts]
        empty = torch.empty(0, dtype=torch.long)
        with torch.inference_mode():
            last = model(build_forward_batch(prompts, [empty] * batch_size, slots, pool)).argmax(-1).tolist()
            new = [pool.alloc(1) for _ in prompts]
            return model(build_forward_batch([[t] for t in last], slots, new, pool))  # type: ignore[arg-type]

    for batch_size in (1, 3, 12, 40):  # 40 rows: past CpuLinear.GGUF_ROWS, on the float32 weights
        torch.testing.assert_close(decode_logits(on_blocks, batch_size), decode_logits(plain, batch_size),
                                   atol=1e-4, rtol=1e-4)
