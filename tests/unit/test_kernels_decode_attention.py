"""Paged GQA decode kernel vs its torch reference (Triton interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

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

K = load_kernel_module("services.scheduler.kernels.decode_attention")

# (seq_lens, num_heads, num_kv_heads, head_dim, v_dim, num_kv_splits): a single key, key counts
# on both sides of the 32-key block, fewer keys than splits, odd head dims, MHA / GQA / MQA.
CASES = [
    ([1], 4, 4, 16, 16, 4),
    ([31, 32, 33], 6, 3, 20, 20, 2),
    ([2, 65], 8, 2, 16, 24, 8),
    ([7], 5, 1, 12, 12, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}")
def test_decode_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    seq_lens, heads, kv_heads, d, dv, splits = case
    torch.manual_seed(sum(seq_lens) + heads)
    pool = sum(seq_lens) + 11
    k_cache = torch.randn(pool, kv_heads, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(pool, kv_heads, dv, device=DEVICE).to(dtype)
    q = torch.randn(len(seq_lens), heads, d, device=DEVICE).to(dtype)
    kv_indptr = paged.indptr_from_lens(seq_lens, DEVICE)
    kv_indices = random_slots(pool, sum(seq_lens), seed=len(seq_lens))
    out = poison(len(seq_lens), heads, dv, dtype=dtype)
    K.decode_attention(q, k_cache, v_cache, kv_indptr, kv_indices, d**-0.5, num_kv_splits=splits, out=out)
    ref = K.decode_attention_ref(q, k_cache, v_cache, kv_indptr, kv_indices, d**-0.5)
    assert_close(out, ref, rtol_for(K.DECODE_RTOL, dtype))


def test_single_key_returns_its_value() -> None:
    # With one key the softmax is 1 whatever the score: the output is exactly that key's value.
    v_cache = torch.randn(9, 2, 16, device=DEVICE)
    out = K.decode_attention(
        torch.randn(1, 4, 16, device=DEVICE), torch.randn(9, 2, 16, device=DEVICE), v_cache,
        paged.indptr_from_lens([1], DEVICE), torch.tensor([5], device=DEVICE), 0.25, num_kv_splits=3,
    )
    torch.testing.assert_close(out[0], v_cache[5].repeat_interleave(2, dim=0))


def test_empty_batch() -> None:
    out = K.decode_attention(
        torch.empty(0, 4, 16, device=DEVICE), torch.randn(8, 2, 16, device=DEVICE), torch.randn(8, 2, 16, device=DEVICE),
        paged.indptr_from_lens([], DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE), 0.25,
    )
    assert out.shape == (0, 4, 16)


def test_rejects_heads_not_a_multiple_of_kv_heads() -> None:
    with pytest.raises(ValueError, match="multiple"):
        K.decode_attention(
            torch.randn(1, 5, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16),
            paged.indptr_from_lens([1], "cpu"), torch.tensor([0]), 0.25,
        )
