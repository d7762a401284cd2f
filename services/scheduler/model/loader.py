"""load_model: build the registered model for a HF checkpoint dir and fill it from *.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import safe_open
from torch import nn
from torch.overrides import TorchFunctionMode

from services.scheduler.model.base import CausalLM
from services.scheduler.model.config import ModelConfig
from services.scheduler.model.parallel import Linears, serve_linears_on_cpu
from services.scheduler.model.registry import get_model_class


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX); without it torch's
    bf16 GEMMs convert in software and run several times slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def serving_dtype(name: str, checkpoint_dtype: str, device: torch.device | str) -> torch.dtype:
    """The dtype `--dtype name` serves in. `auto` (SGLang's default) takes the checkpoint's half
    type where the device computes it natively (CUDA; a CPU with AVX-512 BF16 or AMX) and
    float32 everywhere else, where half-precision GEMMs are emulated and slower."""
    named = {"half": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float": torch.float32, "float32": torch.float32}
    if name != "auto":
        if name not in named:
            raise ValueError(f"unknown --dtype {name!r}; choose auto, {', '.join(named)}")
        return named[name]
    half = named.get(checkpoint_dtype.removeprefix("torch."), torch.float32)
    if half == torch.float32:
        return torch.float32
    if torch.device(device).type == "cuda":
        return half
    return torch.bfloat16 if half == torch.bfloat16 and cpu_has_native_bf16() else torch.float32


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    linears: Linears | None = None,
) -> tuple[CausalLM, ModelConfig]:
    """The model in eval mode with every parameter from the checkpoint, and its config.

    With `linears` (a tensor-parallel builder, e.g. dist.TPLinears) each parallel layer keeps its
    shard of the checkpoint tensor and routed experts of other ranks are skipped.

    Raises ValueError if a parameter is missing from the checkpoint, a checkpoint tensor has no
    parameter, or shapes disagree. Buffers (rotary inv_freq) are computed, never loaded.
    """
    path = Path(path)
    config = ModelConfig.from_hf(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")

    with torch.device("meta"), _SkipNormalInit():
        model = get_model_class(config.architecture)(config, linears)
    params = dict(model.named_parameters(remove_duplicate=False))
    # parameter name -> (its module, if that module cuts a shard from the full tensor; local name)
    shard_owner = {
        f"{mod_name}.{p_name}" if mod_name else p_name: (mod, p_name)
        for mod_name, mod in model.named_modules()
        if hasattr(mod, "shard_weight")
        for p_name, _ in mod.named_parameters(recurse=False)
    }
    is_remote = getattr(linears, "is_remote", None)
    tied = model.tied_parameter_names()
    # Parameters kept in float32 whatever `dtype` is (e.g. MoE routing's score correction bias).
    fp32 = model.keep_fp32_suffixes

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name in tied:
                    continue  # the tie wins over a redundant copy in the file
                if is_remote is not None and name not in params and is_remote(name, config.moe):
                    continue  # another rank's routed expert
                if name not in params or name.endswith("rotary_emb.inv_freq"):
                    unexpected.append(name)
                    continue
                t = sf.get_tensor(name)
                if name in shard_owner:
                    mod, local_name = shard_owner[name]
                    t = mod.shard_weight(local_name, t)
                if tuple(t.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(params[name].shape)}"
                    )
                loaded[name] = t.to(device=device, dtype=torch.float32 if name.endswith(fp32) else dtype)
    missing = sorted(set(params) - set(loaded) - tied)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match {config.architecture}: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {sorted(unexpected)[:10]}{'...' if len(unexpected) > 10 else ''}"
        )

    # Materialize on the target device, then load; assign=True keeps our loaded tensors.
    model = model.to_empty(device=device)
    model.load_state_dict(loaded, strict=False, assign=True)
    model.tie_weights()
    model.to(dtype=dtype)
    for name, param in model.named_parameters():
        if fp32 and name.endswith(fp32):
            param.data = loaded[name]
    _init_buffers(model, device)  # after the cast: rotary frequencies stay float32
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        _attach_gguf_blocks(model, path, config)
    for m in model.modules():
        if hasattr(m, "fuse_projections"):
            m.fuse_projections()  # q/k/v and gate/up as one GEMM each, where layers are plain
    serve_linears_on_cpu(model)
    model.eval()
    model.requires_grad_(False)
    return model, config


def _attach_gguf_blocks(model: nn.Module, path: Path, config: ModelConfig) -> None:
    """Hands each plain Linear whose weight a converted GGUF checkpoint kept as raw blocks
    (shared.gguf.BLOCKS_FILE) those blocks, as `gguf_blocks = (type, uint8 tensor)`; the tied
    LM head takes the embedding's."""
    from shared.gguf import BLOCKS_FILE

    file = path / BLOCKS_FILE
    if not file.exists():
        return
    modules = dict(model.named_modules())
    with safe_open(str(file), framework="pt", device="cpu") as sf:
        types = sf.metadata() or {}
        for name in sf.keys():
            owner = name.removesuffix(".weight")
            if config.tie_word_embeddings and owner == "model.embed_tokens":
                owner = "lm_head"
            module = modules.get(owner)
            if type(module) is nn.Linear and name in types:
                module.gguf_blocks = (types[name], sf.get_tensor(name))


class _SkipNormalInit(TorchFunctionMode):
    """Skips `normal_` (nn.Embedding's initializer) while the skeleton is built on the meta device,
    where it would only mark values the checkpoint replaces. On meta it runs torch's Python kernel,
    whose first call imports torch._dynamo: seconds of every scheduler's start."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in (nn.init.normal_, torch.Tensor.normal_):
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def _init_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute non-persistent buffers that to_empty left uninitialized (rotary inv_freq)."""
    from services.scheduler.model.layers import RotaryEmbedding, rope_inv_freq

    cfg: ModelConfig = model.config  # type: ignore[assignment]
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
        elif hasattr(m, "init_buffers"):
            m.init_buffers(device)  # modules that know how to rebuild their own buffers
