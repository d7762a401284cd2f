"""Tensor + expert parallelism (gloo, 2 CPU processes): a DeepSeek-V3 tiny model sharded over
tp 2 (heads, dense MLP and shared experts split by TP, routed experts split by EP, vocab-split
embedding and LM head) gives the tp 1 logits for prefill and for a mixed decode step."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.launcher.tiny_model import create_tiny_model
from services.scheduler.model import build_forward_batch, load_model
from services.scheduler.model.dist import ColumnParallelLinear, ParallelLMHead, TPLinears
from services.scheduler.model.mla_pool import make_kv_pool

TP = 2
EMPTY = torch.empty(0, dtype=torch.long)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_steps(model: torch.nn.Module, config, vocab: int) -> list[torch.Tensor]:  # noqa: ANN001
    """Prefill three prompts of different lengths, then one decode step for all of them."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (1, 9, 33)]
    pool = make_kv_pool(config, 128)
    slots = [pool.alloc(len(p)) for p in prompts]
    out = []
    with torch.inference_mode():
        logits = model(build_forward_batch(prompts, [EMPTY] * 3, slots, pool))
        out.append(logits)
        nxt = [[t] for t in logits.argmax(-1).tolist()]
        new = [pool.alloc(1) for _ in prompts]
        out.append(model(build_forward_batch(nxt, slots, new, pool)))
    return out


def _worker(rank: int, port: int, model_dir: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP)
    try:
        model, config = load_model(model_dir, linears=TPLinears(rank, TP))
        moe = model.model.layers[1].mlp
        # this rank holds only its half of the heads, vocab and routed experts.
        assert sorted(int(e) for e in moe.experts) == list(range(rank * 4, rank * 4 + 4))
        attn = model.model.layers[0].self_attn
        assert isinstance(attn.q_b_proj, ColumnParallelLinear) and attn.num_heads == 2
        assert isinstance(model.lm_head, ParallelLMHead) and model.lm_head.weight.shape[0] == 500
        outs = _run_steps(model, config, config.vocab_size)
        torch.save([o.clone() for o in outs], Path(result_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_deepseek_v3_matches_tp1(tmp_path: Path) -> None:
    d = create_tiny_model(tmp_path / "model", arch="deepseek_v3")
    ref_model, config = load_model(d)
    ref = _run_steps(ref_model, config, config.vocab_size)

    mp.spawn(_worker, args=(_free_port(), str(d), str(tmp_path)), nprocs=TP, join=True)
    for rank in range(TP):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            torch.testing.assert_close(g, r, atol=2e-4, rtol=0)
