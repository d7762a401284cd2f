"""Extend (prefill over a cached prefix) kernel vs its torch reference and vs torch SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.scheduler.kernels import paged
from tests.unit.kernel_checks import (
    DEVICE,
    DTYPES,
    assert_close,
    load_kernel_module,
    poison,
    random_slots,
    rtol_for,
)

K = load_kernel_module("services.scheduler.kernels.extend_attention")

# (extend_lens, prefix_lens, num_heads, num_kv_heads, head_dim): decode rows mixed with prefills,
# extends across the 16/32-row query block, prefixes across the 32-key block, odd head dims.
CASES = [
    ([1], [0], 2, 2, 16),
    ([5, 1, 17], [0, 12, 32], 4, 2, 16),
    ([33], [7], 3, 1, 20),
    ([1, 1, 2], [31, 32, 0], 4, 4, 12),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"ext{c[0]}-pre{c[1]}-h{c[2]}-kv{c[3]}")
def test_extend_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    ext, pre, heads, kv_heads, d = case
    seq = [e + p for e, p in zip(ext, pre, strict=True)]
    torch.manual_seed(sum(seq))
    pool = sum(seq) + 9
    k_cache = torch.randn(pool, kv_heads, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(pool, kv_heads, d, device=DEVICE).to(dtype)
    q = torch.randn(sum(ext), heads, d, device=DEVICE).to(dtype)
    qo_indptr, kv_indptr = paged.indptr_from_lens(ext, DEVICE), paged.indptr_from_lens(seq, DEVICE)
    kv_indices = random_slots(pool, sum(seq), seed=2)
    out = poison(sum(ext), heads, d, dtype=dtype)
    K.extend_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, max(ext), d**-0.5, out=out)
    ref = K.extend_attention_ref(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, d**-0.5)
    assert_close(out, ref, rtol_for(K.EXTEND_RTOL, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_mla_prefill_as_multi_query_over_the_latent_rows(dtype: torch.dtype) -> None:
    """How TritonMLABackend prefills: one latent "kv head" [c_kv | k_rope] per token, the values its
    first kv_lora_rank columns (a strided view, DV < D), every query head reading it."""
    ext, pre, heads, c, r = [3, 1, 18], [0, 9, 33], 5, 24, 8
    seq = [e + p for e, p in zip(ext, pre, strict=True)]
    torch.manual_seed(4)
    pool = sum(seq) + 3
    cache = torch.randn(pool, 1, c + r, device=DEVICE).to(dtype)
    values = cache[..., :c]
    assert values.stride(0) == c + r  # really a view into the latent rows, not a copy
    q = torch.randn(sum(ext), heads, c + r, device=DEVICE).to(dtype)
    qo_indptr, kv_indptr = paged.indptr_from_lens(ext, DEVICE), paged.indptr_from_lens(seq, DEVICE)
    kv_indices = random_slots(pool, sum(seq), seed=5)
    out = poison(sum(ext), heads, c, dtype=dtype)
    K.extend_attention(q, cache, values, qo_indptr, kv_indptr, kv_indices, max(ext), 0.1, out=out)
    ref = K.extend_attention_ref(q, cache, values, qo_indptr, kv_indptr, kv_indices, 0.1)
    assert_close(out, ref, rtol_for(K.EXTEND_RTOL, dtype))


def test_reference_agrees_with_sdpa_without_prefix() -> None:
    # The reference itself is checked against torch's causal SDPA on a contiguous, prefix-free case.
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    ptr = paged.indptr_from_lens([10], "cpu")
    ref = K.extend_attention_ref(q, k, v, ptr, ptr, torch.arange(10), 0.25)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25)
    torch.testing.assert_close(ref, sdpa.transpose(0, 1))


def test_empty_batch() -> None:
    none = paged.indptr_from_lens([], DEVICE)
    out = K.extend_attention(
        torch.empty(0, 2, 16, device=DEVICE), torch.randn(4, 2, 16, device=DEVICE), torch.randn(4, 2, 16, device=DEVICE),
        none, none, torch.empty(0, dtype=torch.long, device=DEVICE), 0, 0.25,
    )
    assert out.shape == (0, 2, 16)
