"""The step protocol of a scheduler world, 2 gloo processes (dist_sync.py, dp_attention.py):
the leader's inputs and sampled tokens reach its follower intact (msgspec bytes, no pickle);
DP attention's all-gather of token counts, and around_mlp's gather -> feed-forward -> slice-back
with an idle group (0 tokens) and with uneven groups."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from services.scheduler.dist_sync import GroupSync, StepInputs, init_world
from services.scheduler.dp_attention import DPAttentionLinears, ParallelLayout, new_attn_groups
from services.scheduler.setup import group_chunk_size
from shared.messages import SamplingParams, TokenizedRequest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(group: int, n: int) -> torch.Tensor:
    return torch.arange(n * 4, dtype=torch.float32).view(n, 4) + 100 * group


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tp = ParallelLayout.from_args(2, 1, rank, enable_dp_attention=False)  # one group of 2 ranks
    init_world(tp, f"127.0.0.1:{port}", "cpu")
    try:
        results: dict[str, object] = {}
        sync = GroupSync(tp, new_attn_groups(tp))
        req = TokenizedRequest(rid="r1", gateway_id="g", input_ids=[5, 6, 7], sampling=SamplingParams(temperature=0.5))
        sent = StepInputs(reqs=[req], aborts=["r0"], flush=True) if rank == 0 else None
        got = sync.share_inputs(sent)
        results["inputs"] = (got.reqs[0].rid, got.reqs[0].input_ids, got.reqs[0].sampling.temperature, got.aborts, got.flush)
        results["empty"] = sync.share_inputs(StepInputs() if rank == 0 else None) == StepInputs()
        results["tokens"] = sync.share_tokens([11, 12] if rank == 0 else [98, 99])

        dpa = ParallelLayout.from_args(2, 2, rank, enable_dp_attention=True)  # two groups of 1 rank
        group = new_attn_groups(dpa)
        dsync = GroupSync(dpa, group)
        lin = DPAttentionLinears(dpa, group)
        seen: list[torch.Tensor] = []

        def mlp(full: torch.Tensor) -> torch.Tensor:
            seen.append(full.clone())
            return full * 2

        for name, mine in (("idle", [3, 0][rank]), ("uneven", [2, 5][rank])):
            counts = dsync.gather_counts(mine)
            lin.step_tokens = counts
            out = lin.around_mlp(_rows(rank, mine), mlp)
            results[name] = (counts, out, seen[-1])
        # every group idle: no feed-forward runs
        lin.step_tokens = dsync.gather_counts(0)
        results["all_idle"] = (lin.step_tokens, lin.around_mlp(_rows(rank, 0), mlp).shape, len(seen))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_step_sync_and_dp_attention_gather(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in res:  # the follower got exactly what the leader sent; the leader's tokens win
        assert r["inputs"] == ("r1", [5, 6, 7], 0.5, ["r0"], True)
        assert r["empty"] is True
        assert r["tokens"] == [11, 12]
    # group 1 idle: both ranks run the feed-forward on group 0's 3 rows; group 1 gets 0 rows back
    for rank, r in enumerate(res):
        counts, out, full = r["idle"]
        assert counts == [3, 0]
        torch.testing.assert_close(full, _rows(0, 3))
        assert out.shape == (3 if rank == 0 else 0, 4)
        if rank == 0:
            torch.testing.assert_close(out, _rows(0, 3) * 2)
    for rank, r in enumerate(res):  # uneven groups: rows in group order, each takes its own back
        counts, out, full = r["uneven"]
        assert counts == [2, 5]
        torch.testing.assert_close(full, torch.cat([_rows(0, 2), _rows(1, 5)]))
        torch.testing.assert_close(out, _rows(rank, counts[rank]) * 2)
    for r in res:
        assert r["all_idle"] == ([0, 0], torch.Size([0, 4]), 2)


def test_dp_attention_divides_the_step_chunk_among_the_groups() -> None:
    """SGLang's rule: with DP attention the MLP runs over every group's tokens at once, so each
    group gets `--chunked-prefill-size` / groups; plain TP and 'off' keep the flag as given."""
    dpa = ParallelLayout.from_args(16, 16, 3, True)
    plain = ParallelLayout.from_args(16, 1, 3, False)
    assert group_chunk_size(8192, dpa) == 512 and group_chunk_size(8192, plain) == 8192
    assert group_chunk_size(-1, dpa) == -1 and group_chunk_size(10, dpa) == 1
