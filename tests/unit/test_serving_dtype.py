"""--dtype auto: the checkpoint's half type only where the device computes it natively."""

import pytest
import torch

from services.scheduler.model import loader
from services.scheduler.model.loader import serving_dtype
from shared.config import ServerArgs


def test_named_dtypes_win_over_the_checkpoint() -> None:
    assert serving_dtype("float32", "bfloat16", "cpu") == torch.float32
    assert serving_dtype("bfloat16", "float32", "cpu") == torch.bfloat16
    assert serving_dtype("half", "float32", "cpu") == torch.float16
    assert serving_dtype("float", "bfloat16", "cpu") == torch.float32


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_takes_bf16_only_with_native_instructions(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    assert serving_dtype("auto", "bfloat16", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert serving_dtype("auto", "torch.bfloat16", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert serving_dtype("auto", "float32", "cpu") == torch.float32
    # float16 GEMMs are emulated on CPUs: auto never picks them there
    assert serving_dtype("auto", "float16", "cpu") == torch.float32


def test_auto_on_cuda_takes_the_checkpoint_half_type() -> None:
    assert serving_dtype("auto", "float16", "cuda") == torch.float16
    assert serving_dtype("auto", "bfloat16", "cuda") == torch.bfloat16
    assert serving_dtype("auto", "float32", "cuda") == torch.float32


def test_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="--dtype"):
        ServerArgs(dtype="fp8").validate()
    with pytest.raises(SystemExit):
        ServerArgs.parse(["--dtype", "fp8"])
