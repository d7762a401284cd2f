"""C kernels for the CPU torch path, built once with the system's gcc and called through ctypes.

- `decode_attention` attends one query token per request over the KV pool through each
  request's slot list: the padded gather it replaces copied every request's K and V once per
  layer, which at batch 32 moved about as many bytes as the weights.
- `gguf_linear` computes a Linear of a few rows from the weight's GGUF blocks (Q4_1, Q8_0),
  decoded on the fly: a small-batch decode step is bound by the weight bytes it reads.
- `apply_token_bitmask` masks logits with a structured output's token bitmask (grammar.py).

Built into the cache dir ($DPSERVE_CACHE_DIR or ~/.cache/dpserve, keyed by the sources' hash)
at first use, for x86-64 CPUs with AVX2, FMA and F16C; elsewhere, where no compiler is found,
or with DPSERVE_CPU_KERNELS=0, the loaders return None and the torch code runs instead.
Float32 only (the CPU serving dtype, services.scheduler.model.loader.serving_dtype).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("scheduler.cpu")

_SOURCES = [Path(__file__).with_name(f) for f in ("decode_attention.c", "gguf_gemv.c", "token_mask.c")]
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-ffast-math", "-fPIC", "-shared"]
_CPU_FLAGS = ("avx2", "fma", "f16c")
GGUF_BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # bytes per block of 32 weights


def _cache_dir() -> Path:
    return Path(os.environ.get("DPSERVE_CACHE_DIR") or Path.home() / ".cache" / "dpserve") / "kernels"


def _build() -> ctypes.CDLL | None:
    if os.environ.get("DPSERVE_CPU_KERNELS", "1") == "0" or not _cpu_supports():
        return None
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        log.warning("no C compiler found: the CPU kernels run in torch (slower)")
        return None
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in _SOURCES) + " ".join(_FLAGS).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"cpu_kernels-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        # several ranks may build at once: each writes its own file, the rename is atomic
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *_FLAGS, *map(str, _SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            log.warning("building the CPU kernels failed (%s %s): they run in torch", e,
                        detail.decode(errors="replace")[-500:])
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    fn = dll.decode_attention_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 4 + [ctypes.c_float]
    for name in ("gemv_q4_1", "gemv_q8_0"):
        fn = getattr(dll, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    fn = dll.apply_token_bitmask_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3
    return dll


def _cpu_supports() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in flags for flag in _CPU_FLAGS)


_lib: ctypes.CDLL | None = None
_tried = False


def _loaded() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        _tried = True
        _lib = _build()
    return _lib


def load_decode_attention() -> Callable[..., torch.Tensor] | None:
    """The C decode attention (built at first call), or None where it cannot be built."""
    return None if _loaded() is None else decode_attention


def load_gguf_linear() -> Callable[..., torch.Tensor] | None:
    """The C GGUF-block Linear (built at first call), or None where it cannot be built."""
    return None if _loaded() is None else gguf_linear


def load_apply_token_bitmask() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """The C token-bitmask apply (built at first call), or None where it cannot be built."""
    return None if _loaded() is None else apply_token_bitmask


def apply_token_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """In place: logits[r, t] = -inf where bit t of mask[r] is clear. logits [rows, vocab] float32,
    mask [rows, words] int32 (xgrammar's layout), both contiguous CPU tensors."""
    assert _lib is not None, "call load_apply_token_bitmask() first"
    if logits.dtype != torch.float32 or logits.device.type != "cpu" or not logits.is_contiguous():
        raise ValueError("apply_token_bitmask takes contiguous float32 CPU logits")
    if mask.dtype != torch.int32 or not mask.is_contiguous() or mask.shape[0] != logits.shape[0]:
        raise ValueError("apply_token_bitmask takes a contiguous int32 mask with a row per logits row")
    _lib.apply_token_bitmask_f32(logits.data_ptr(), mask.data_ptr(), logits.shape[0], logits.shape[1], mask.shape[1])


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """x [rows, k] float32 @ W^T, W [n, k] as GGUF blocks uint8
    [n, k / 32 * GGUF_BLOCK_BYTES[qtype]] -> [rows, n] float32."""
    assert _lib is not None, "call load_gguf_linear() first"
    rows, k = x.shape
    n = blocks.shape[0]
    if x.dtype != torch.float32 or not x.is_contiguous() or blocks.dtype != torch.uint8 or not blocks.is_contiguous():
        raise ValueError("gguf_linear takes contiguous float32 x and uint8 blocks")
    if k % 32 or blocks.shape[1] != k // 32 * GGUF_BLOCK_BYTES[qtype]:
        raise ValueError(f"gguf_linear: x {tuple(x.shape)} does not fit {qtype} blocks {tuple(blocks.shape)}")
    out = torch.empty(rows, n, dtype=torch.float32)
    fn = _lib.gemv_q4_1 if qtype == "Q4_1" else _lib.gemv_q8_0
    if fn(x.data_ptr(), blocks.data_ptr(), out.data_ptr(), rows, n, k) != 0:
        raise ValueError("gguf_linear: the kernel refused its arguments")
    return out


def decode_attention(
    q: torch.Tensor,  # [B, H, D] float32
    k_cache: torch.Tensor,  # [N, KVH, D] float32
    v_cache: torch.Tensor,
    kv_indptr: torch.Tensor,  # [B + 1] int64
    kv_indices: torch.Tensor,  # [kv_indptr[-1]] int64
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    assert _lib is not None, "call load_decode_attention() first"
    for t in (q, k_cache, v_cache):
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("decode_attention takes contiguous float32 CPU tensors")
    if kv_indptr.dtype != torch.int64 or kv_indices.dtype != torch.int64:
        raise ValueError("kv_indptr and kv_indices must be int64")
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    rc = _lib.decode_attention_f32(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        kv_indptr.data_ptr(), kv_indices.data_ptr(), batch, num_heads, k_cache.shape[1], head_dim, scale,
    )
    if rc != 0:
        raise MemoryError("decode_attention: out of memory for the score buffer")
    return out
