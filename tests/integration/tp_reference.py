"""Shared by the TP / DP-attention integration tests: tiny checkpoints and transformers' greedy
continuations of a few prompts (the reference every parallel layout must reproduce)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from services.launcher.tiny_model import create_tiny_model
from tests.integration.client import get

PROMPT_LENGTHS = (3, 21)
MAX_NEW = 12


def reference(model_dir: Path, lengths: tuple[int, ...] = PROMPT_LENGTHS, max_new: int = MAX_NEW) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, transformers' greedy continuation) per prompt length. Prompts of one length
    decode as one batch: equal rows need no padding, and a step of transformers' tiny DeepSeek
    costs about the same for 4 rows as for 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(99)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    continuations: dict[int, list[int]] = {}
    for n in dict.fromkeys(lengths):
        rows = [i for i, m in enumerate(lengths) if m == n]
        ids = torch.stack([prompts[i] for i in rows])
        with torch.no_grad():
            full = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        continuations |= {i: full[k, n:].tolist() for k, i in enumerate(rows)}
    return [(prompts[i].tolist(), continuations[i]) for i in range(len(lengths))]


def make_models(root: Path) -> dict[str, Path]:
    return {arch: create_tiny_model(root / arch, arch=arch) for arch in ("deepseek_v3", "deepseek_v2", "llama")}


def wait_ranks(url: str, n: int, timeout: float = 120) -> None:
    """Until /get_server_info lists n live DP ranks (/health answers as soon as one is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, info = get(url + "/get_server_info")
        states = info.get("internal_states", []) if status == 200 else []
        if len([s for s in states if s.get("live", True)]) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{n} DP ranks did not come up at {url}")
