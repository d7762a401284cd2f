"""Greedy parity with transformers through `dpserve serve` for every parallel layout: tp 1, tp 2,
DP attention (tp 2 dp 2 on V2, and tp 4 dp 2 on V3, whose groups split attention over 2 ranks),
Llama tp 2, and dp 2 replicas of tp 2 without DP attention. Each layout is real scheduler
processes in a gloo world. (V3 at tp 2 dp 2 is not run again: its layout is V2's, its model V3's
other cases.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.client import generate
from tests.integration.tp_reference import MAX_NEW, make_models, reference, wait_ranks


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_models(tmp_path_factory.mktemp("tp-models"))


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str, list[tuple[list[int], list[int]]]]:
    return {arch: reference(d) for arch, d in models.items()}


def _check(server, refs: list[tuple[list[int], list[int]]], routed: list[int | None], max_new: int = MAX_NEW) -> None:  # noqa: ANN001
    """Each prompt on each rank in `routed`: the first `max_new` greedy tokens equal the reference's."""
    for rank in routed:
        for prompt, expected in refs:
            body = {"temperature": 0, "max_new_tokens": max_new, "ignore_eos": True}
            extra = {} if rank is None else {"routed_dp_rank": rank}
            out = generate(server.url, input_ids=prompt, sampling_params=body, **extra)
            assert out["output_ids"] == expected[:max_new], (len(prompt), rank)


LAYOUTS = [
    pytest.param("deepseek_v3", [], id="v3-tp1"),
    pytest.param("deepseek_v2", [], id="v2-tp1"),
    pytest.param("deepseek_v3", ["--tp-size", "2"], id="v3-tp2", marks=pytest.mark.slow),
    pytest.param("deepseek_v2", ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"], id="v2-tp2-dp2-dpa"),
    pytest.param(
        "deepseek_v3", ["--tp-size", "4", "--dp-size", "2", "--enable-dp-attention"],
        id="v3-tp4-dp2-dpa-attn_tp2", marks=pytest.mark.slow,
    ),
    pytest.param("llama", ["--tp-size", "2"], id="llama-tp2"),
    pytest.param("deepseek_v3", ["--tp-size", "2", "--dp-size", "2"], id="v3-dp2-replicas-of-tp2", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("arch", "flags"), LAYOUTS)
def test_greedy_matches_transformers(server_factory, models, references, arch: str, flags: list[str]) -> None:
    server = server_factory("--model-path", str(models[arch]), "--max-total-tokens", "4096", *flags)
    dp = int(flags[flags.index("--dp-size") + 1]) if "--dp-size" in flags else 1
    wait_ranks(server.url, dp)
    # every DP rank (group or replica) in turn, so each serves alone while the others idle
    _check(server, references[arch], list(range(dp)))
    server.stop()


# Under the interpreter a decode step costs about a second: 6 new tokens, not the 12 the torch
# layouts check (a prefill, then 5 decode steps over 4..8 and 22..26 cached tokens: the same kernels).
TRITON_MAX_NEW = 6
TRITON_LAYOUTS = [
    pytest.param("deepseek_v3", [], id="v3-tp1"),
    # DP attention: latent attention per group, experts split over the ranks (the EP kernel path)
    pytest.param("deepseek_v2", ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"], id="v2-tp2-dp2-dpa"),
]


@pytest.mark.parametrize(("arch", "flags"), TRITON_LAYOUTS)
def test_triton_kernels_match_transformers(server_factory, models, references, arch: str, flags: list[str]) -> None:
    """Every rank on the Triton path (MLA decode/extend, grouped-GEMM MoE, fused norm, rotary),
    under the interpreter on the CPU: the same greedy continuations as transformers."""
    server = server_factory(
        "--model-path", str(models[arch]), "--max-total-tokens", "4096", "--attention-backend", "triton", *flags,
        env={"TRITON_INTERPRET": "1"},
    )
    dp = int(flags[flags.index("--dp-size") + 1]) if "--dp-size" in flags else 1
    wait_ranks(server.url, dp)
    ranks = int(flags[flags.index("--tp-size") + 1]) if "--tp-size" in flags else 1  # DP attention: tp = world
    assert server.log().count("attention backend: triton (TritonMLABackend; DeepseekMoE") == ranks
    _check(server, references[arch], list(range(dp)), max_new=TRITON_MAX_NEW)
    server.stop()
