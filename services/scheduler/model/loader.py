"""load_model: build the registered model for a HF checkpoint dir and fill it from *.safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import safe_open
from torch import nn

from services.scheduler.model.config import ModelConfig
from services.scheduler.model.registry import get_model_class


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, ModelConfig]:
    """The model in eval mode with every parameter from the checkpoint, and its config.

    Raises ValueError if a parameter is missing from the checkpoint, a checkpoint tensor has no
    parameter, or shapes disagree. Buffers (rotary inv_freq) are computed, never loaded.
    """
    path = Path(path)
    config = ModelConfig.from_hf(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")

    with torch.device("meta"):
        model = get_model_class(config.architecture)(config)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied: set[str] = model.tied_parameter_names() if hasattr(model, "tied_parameter_names") else set()

    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name in tied:
                    continue  # the tie wins over a redundant copy in the file
                if name not in params or name.endswith("rotary_emb.inv_freq"):
                    unexpected.append(name)
                    continue
                t = sf.get_tensor(name)
                if tuple(t.shape) != tuple(params[name].shape):
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(params[name].shape)}"
                    )
                loaded[name] = t.to(device=device, dtype=dtype)
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
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(dtype=dtype)
    _init_buffers(model, device)  # after the cast: rotary frequencies stay float32
    model.eval()
    model.requires_grad_(False)
    return model, config


def _init_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Recompute non-persistent buffers that to_empty left uninitialized (rotary inv_freq)."""
    from services.scheduler.model.layers import RotaryEmbedding, rope_inv_freq

    cfg: ModelConfig = model.config  # type: ignore[assignment]
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
