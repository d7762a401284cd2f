"""Greedy outputs served over the bus equal Hugging Face transformers' on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.client import generate

PROMPT_LENGTHS = (1, 7, 33, 150)
MAX_NEW = 16


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[int, tuple[list[int], list[int]]]:
    """prompt length -> (prompt ids, transformers' greedy continuation)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for n in PROMPT_LENGTHS:
        ids = torch.randint(3, vocab, (1, n), generator=gen)
        with torch.no_grad():
            full = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
        out[n] = (ids[0].tolist(), full[0, n:].tolist())
    return out


@pytest.mark.parametrize("dp_size", [1, 2])
def test_greedy_matches_transformers(server_factory, reference, dp_size: int) -> None:
    server = server_factory("--dp-size", str(dp_size))
    for n, (prompt, expected) in reference.items():
        out = generate(
            server.url,
            input_ids=prompt,
            sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW, "ignore_eos": True},
        )
        assert out["output_ids"] == expected, f"prompt length {n}"
        meta = out["meta_info"]
        assert meta["prompt_tokens"] == n
        assert meta["completion_tokens"] == MAX_NEW
        assert meta["finish_reason"] == {"type": "length", "length": MAX_NEW}
