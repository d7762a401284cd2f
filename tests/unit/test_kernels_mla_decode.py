"""Absorbed-form MLA decode kernel over the latent cache vs its torch references."""

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

K = load_kernel_module("services.scheduler.kernels.mla_decode")

# (seq_lens, num_heads, kv_lora_rank, rope_dim, num_kv_splits): heads below / above one 16-row
# block, a latent width that is not a power of two, key counts across the 16-key block.
CASES = [
    ([1], 4, 32, 16, 2),
    ([15, 16, 17], 5, 24, 8, 3),
    ([40], 20, 32, 16, 4),
]


def _inputs(case: tuple, dtype: torch.dtype) -> tuple:
    seq_lens, heads, c, r, _ = case
    torch.manual_seed(sum(seq_lens) * heads)
    pool = sum(seq_lens) + 5
    cache = torch.randn(pool, 1, c + r, device=DEVICE).to(dtype)
    q_latent = torch.randn(len(seq_lens), heads, c, device=DEVICE).to(dtype)
    q_rope = torch.randn(len(seq_lens), heads, r, device=DEVICE).to(dtype)
    return q_latent, q_rope, cache, paged.indptr_from_lens(seq_lens, DEVICE), random_slots(pool, sum(seq_lens), 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"lens{c[0]}-h{c[1]}-c{c[2]}-r{c[3]}")
def test_mla_decode_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    q_latent, q_rope, cache, kv_indptr, kv_indices = _inputs(case, dtype)
    scale = (case[2] + case[3]) ** -0.5
    out = poison(*q_latent.shape, dtype=dtype)
    K.mla_decode(q_latent, q_rope, cache, kv_indptr, kv_indices, scale, num_kv_splits=case[4], out=out)
    ref = K.mla_decode_ref(q_latent, q_rope, cache, kv_indptr, kv_indices, scale)
    assert_close(out, ref, rtol_for(K.MLA_DECODE_RTOL, dtype))


def test_absorbed_form_equals_decompressed_attention() -> None:
    # q_latent = q_nope @ W_UK and o = W_UV @ kernel_output must equal MLA with K/V decompressed.
    seq_lens, heads, c, r, p, vdim = [9, 20], 4, 24, 8, 12, 10
    torch.manual_seed(7)
    pool = 40
    cache = torch.randn(pool, c + r, device=DEVICE)
    q_nope = torch.randn(2, heads, p, device=DEVICE)
    q_rope = torch.randn(2, heads, r, device=DEVICE)
    w_uk = torch.randn(heads, p, c, device=DEVICE) * 0.3
    w_uv = torch.randn(heads, vdim, c, device=DEVICE) * 0.3
    kv_indptr, kv_indices = paged.indptr_from_lens(seq_lens, DEVICE), random_slots(pool, sum(seq_lens), 1)
    scale = (p + r) ** -0.5
    q_latent = torch.einsum("bhp,hpc->bhc", q_nope, w_uk).contiguous()
    latent_out = K.mla_decode(q_latent, q_rope, cache, kv_indptr, kv_indices, scale, num_kv_splits=2)
    out = torch.einsum("bhc,hvc->bhv", latent_out, w_uv)
    ref = K.mla_decode_unabsorbed_ref(q_nope, q_rope, cache, w_uk, w_uv, kv_indptr, kv_indices, scale)
    assert_close(out, ref, 1e-5)


def test_empty_batch_and_width_check() -> None:
    cache = torch.randn(8, 40, device=DEVICE)
    empty = K.mla_decode(
        torch.empty(0, 4, 32, device=DEVICE), torch.empty(0, 4, 8, device=DEVICE), cache,
        paged.indptr_from_lens([], DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE), 0.1,
    )
    assert empty.shape == (0, 4, 32)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        K.mla_decode(
            torch.randn(1, 4, 32, device=DEVICE), torch.randn(1, 4, 16, device=DEVICE), cache,
            paged.indptr_from_lens([1], DEVICE), torch.tensor([0], device=DEVICE), 0.1,
        )
