"""Sort-by-expert + grouped GEMM MoE kernel vs the per-expert torch reference."""

from __future__ import annotations

import pytest
import torch

from tests.unit.kernel_checks import DEVICE, DTYPES, assert_close, load_kernel_module, rtol_for

K = load_kernel_module("services.scheduler.kernels.moe")

# (tokens, top_k, experts, hidden, inter): one token, odd sizes, more experts than pairs (some
# experts get nothing), a run longer than one 16-row block.
CASES = [(1, 1, 3, 16, 8), (7, 2, 5, 20, 12), (3, 2, 8, 32, 16), (19, 3, 4, 24, 40)]


def _routing(tokens: int, top_k: int, experts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    return weights.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}-k{}-e{}-h{}-i{}".format(*c))
def test_fused_moe_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    tokens, top_k, experts, hidden, inter = case
    g = torch.Generator().manual_seed(tokens * experts)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(DEVICE, dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * inter**-0.5).to(DEVICE, dtype)
    weights, ids = _routing(tokens, top_k, experts, g)
    out = K.fused_moe(x, w13, w2, weights, ids)
    assert_close(out, K.fused_moe_ref(x, w13, w2, weights, ids), rtol_for(K.MOE_RTOL, dtype))


@pytest.mark.parametrize("expert_start", [0, 3, 6])
def test_an_expert_parallel_slice_leaves_other_ranks_experts_out(expert_start: int) -> None:
    """A rank holding experts 3..5 of 9: pairs routed elsewhere add nothing (and are not NaN)."""
    tokens, top_k, experts, hidden, inter = 11, 3, 9, 24, 12
    g = torch.Generator().manual_seed(expert_start)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * hidden**-0.5).to(DEVICE)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * inter**-0.5).to(DEVICE)
    weights, ids = _routing(tokens, top_k, experts, g)
    mine = slice(expert_start, expert_start + 3)
    out = K.fused_moe(x, w13[mine].contiguous(), w2[mine].contiguous(), weights, ids, expert_start=expert_start)
    ref = K.fused_moe_ref(x, w13[mine], w2[mine], weights, ids, expert_start=expert_start)
    assert_close(out, ref, rtol_for(K.MOE_RTOL, torch.float32))
    # the three slices add up to the whole layer
    whole = K.fused_moe_ref(x, w13, w2, weights, ids)
    parts = sum(
        K.fused_moe_ref(x, w13[s : s + 3], w2[s : s + 3], weights, ids, expert_start=s) for s in (0, 3, 6)
    )
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens,top_k,experts,block_m", [(7, 2, 5, 4), (1, 1, 3, 16), (30, 3, 4, 8)])
def test_moe_align_groups_every_pair_once(tokens: int, top_k: int, experts: int, block_m: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    _, ids = _routing(tokens, top_k, experts, g)
    sorted_ids, block_expert = K.moe_align(ids, experts, block_m)
    pairs = tokens * top_k
    sorted_ids, block_expert, flat = sorted_ids.cpu(), block_expert.cpu(), ids.flatten().cpu()
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))  # every (token, slot) pair exactly once
    assert bool((sorted_ids[sorted_ids >= pairs] == pairs).all())  # the rest is the pad sentinel
    for j, e in enumerate(block_expert.tolist()):
        block = sorted_ids[j * block_m : (j + 1) * block_m]
        live = block[block < pairs]
        if e < 0:
            assert live.numel() == 0
        else:
            assert bool((flat[live] == e).all())  # a block holds one expert's pairs only


def test_no_tokens_and_bad_shapes() -> None:
    w13, w2 = torch.randn(2, 8, 16, device=DEVICE), torch.randn(2, 16, 4, device=DEVICE)
    empty = K.fused_moe(
        torch.empty(0, 16, device=DEVICE), w13, w2,
        torch.empty(0, 2, device=DEVICE), torch.empty(0, 2, dtype=torch.long, device=DEVICE),
    )
    assert empty.shape == (0, 16)
    with pytest.raises(ValueError, match="disagree"):
        K.fused_moe(torch.randn(1, 12, device=DEVICE), w13, w2, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long))
