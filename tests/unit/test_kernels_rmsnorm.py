"""Fused residual-add + RMSNorm kernel vs its reference and vs model.layers.RMSNorm."""

from __future__ import annotations

import pytest
import torch

from services.scheduler.model.layers import RMSNorm
from tests.unit.kernel_checks import DEVICE, DTYPES, assert_close, load_kernel_module, poison, rtol_for

K = load_kernel_module("services.scheduler.kernels.rmsnorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 16), (5, 33), (3, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(rows: int, cols: int, with_residual: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(rows * cols)
    x = (torch.randn(rows, cols, device=DEVICE) * 3).to(dtype)
    residual = torch.randn(rows, cols, device=DEVICE).to(dtype) if with_residual else None
    weight = torch.randn(cols, device=DEVICE).to(dtype)
    out, res_out = poison(rows, cols, dtype=dtype), poison(rows, cols, dtype=dtype)
    got, got_res = K.fused_add_rmsnorm(x, weight, 1e-6, residual, out=out, residual_out=res_out)
    ref, ref_res = K.fused_add_rmsnorm_ref(x, weight, 1e-6, residual)
    rtol = rtol_for(K.RMSNORM_RTOL, dtype)
    assert_close(out, ref, rtol)
    assert_close(got_res, ref_res, rtol)
    if residual is None:
        assert got_res is x


def test_matches_model_layer() -> None:
    torch.manual_seed(1)
    layer = RMSNorm(48, eps=1e-5).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48))
    x, res = torch.randn(6, 48, device=DEVICE), torch.randn(6, 48, device=DEVICE)
    with torch.no_grad():
        out, new_res = K.fused_add_rmsnorm(x, layer.weight, layer.eps, res)
        torch.testing.assert_close(out, layer(x + res))
    torch.testing.assert_close(new_res, x + res)


def test_empty_rows() -> None:
    out, res = K.fused_add_rmsnorm(torch.empty(0, 8, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6)
    assert out.shape == res.shape == (0, 8)
