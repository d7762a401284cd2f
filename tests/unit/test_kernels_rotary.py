"""Rotary embedding kernel vs its reference and vs model.layers.RotaryEmbedding."""

from __future__ import annotations

import pytest
import torch

from services.scheduler.model.layers import RotaryEmbedding, rope_inv_freq
from tests.unit.kernel_checks import DEVICE, DTYPES, assert_close, load_kernel_module, poison, rtol_for

K = load_kernel_module("services.scheduler.kernels.rotary")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim,rot_dim", [(1, 2, 1, 16, 16), (5, 3, 3, 24, 24), (4, 4, 2, 20, 8)])
def test_rotary_matches_reference(
    tokens: int, heads: int, kv_heads: int, head_dim: int, rot_dim: int, is_neox: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(tokens + head_dim)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    q = torch.randn(tokens, heads, head_dim, device=DEVICE).to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device=DEVICE).to(dtype)
    inv_freq = rope_inv_freq(rot_dim, 10000.0, None).to(DEVICE)
    q_out, k_out = poison(*q.shape, dtype=dtype), poison(*k.shape, dtype=dtype)
    K.rotary_embedding(positions, q, k, inv_freq, is_neox, q_out=q_out, k_out=k_out)
    q_ref, k_ref = K.rotary_ref(positions, q, k, inv_freq, is_neox)
    rtol = rtol_for(K.ROTARY_RTOL, dtype)
    assert_close(q_out, q_ref, rtol)
    assert_close(k_out, k_ref, rtol)


def test_in_place_matches_model_layer() -> None:
    torch.manual_seed(3)
    rope = RotaryEmbedding(16, 10000.0, None).to(DEVICE)
    positions = torch.tensor([0, 1, 7, 300], device=DEVICE)
    q, k = torch.randn(4, 4, 16, device=DEVICE), torch.randn(4, 2, 16, device=DEVICE)
    q_ref, k_ref = rope(positions, q, k)
    q_out, k_out = K.rotary_embedding(positions, q, k, rope.inv_freq, True, q_out=q, k_out=k)
    assert q_out is q and k_out is k
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k_ref, atol=1e-5, rtol=1e-5)


def test_empty_and_too_wide() -> None:
    inv = rope_inv_freq(8, 10000.0, None).to(DEVICE)
    q_out, _ = K.rotary_embedding(
        torch.empty(0, dtype=torch.long, device=DEVICE), torch.empty(0, 2, 8, device=DEVICE),
        torch.empty(0, 1, 8, device=DEVICE), inv,
    )
    assert q_out.shape == (0, 2, 8)
    with pytest.raises(ValueError, match="rotary dim"):
        K.rotary_embedding(torch.zeros(1, dtype=torch.long), torch.randn(1, 2, 4), torch.randn(1, 1, 4), inv.cpu())
