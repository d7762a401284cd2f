"""Shared by the tests/unit/test_kernels_*.py modules: run the Triton kernels on the CPU under
Triton's interpreter, poison outputs, compare with the torch references.

Triton decides interpreter-or-GPU when a `@triton.jit` function is decorated, i.e. when its module
is imported, reading TRITON_INTERPRET at that moment. `load_kernel_module` sets the variable when
there is no CUDA device and re-imports a kernel module that something imported earlier in this
pytest process without it, so the kernel tests hold whatever the collection order.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

# float32 only under the interpreter (it emulates in numpy; half types add nothing but time).
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]


def load_kernel_module(name: str) -> ModuleType:
    """Import services.scheduler.kernels.<...> so that its kernels run on this machine's target."""
    if not ON_GPU:
        from triton.runtime.jit import JITFunction

        # Forget kernel modules decorated for the GPU before TRITON_INTERPRET was set (a module
        # importing another, as mla_decode imports decode_attention, gets the fresh one too).
        for mod_name, mod in list(sys.modules.items()):
            if mod_name.startswith("services.scheduler.kernels.") and any(
                type(v) is JITFunction for v in vars(mod).values()
            ):
                del sys.modules[mod_name]
    module = importlib.import_module(name)
    if not ON_GPU:
        from triton.runtime.interpreter import InterpretedFunction

        assert any(isinstance(v, InterpretedFunction) for v in vars(module).values()), f"{name} not interpreted"
    return module


def rtol_for(table: dict[str, float], dtype: torch.dtype) -> float:
    name = str(dtype).removeprefix("torch.")
    return table[name if ON_GPU else f"interpret_{name}"]


def poison(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write shows up."""
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """No NaN anywhere, and max |out - ref| <= rtol * max |ref| (the bound the kernel states)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "kernel left NaN (unwritten or non-finite) elements"
    err = (out.float() - ref.float()).abs().max().item() if out.numel() else 0.0
    scale = ref.float().abs().max().item() if ref.numel() else 1.0
    assert err <= rtol * max(scale, 1e-6), f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


def random_slots(pool_size: int, n: int, seed: int) -> torch.Tensor:
    """n distinct pool slots in random (non-contiguous) order, as a paged KV would hand out."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(pool_size, generator=g)[:n].to(DEVICE)


