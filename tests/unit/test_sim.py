"""--device sim: the cost model against hand-computed rooflines, and the real engine over SimRunner
(deterministic tokens, KV accounting through retraction and aborts)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from services.scheduler.dp_attention import ParallelLayout
from services.scheduler.engine import Engine
from services.scheduler.request import Req
from services.scheduler.sim.checkpoints import write_sim_checkpoint
from services.scheduler.sim.cost import HARDWARE, CostModel, ModelShape, Row
from services.scheduler.sim.rank import build_sim_rank
from shared.config import ServerArgs
from shared.messages import SamplingParams, TokenOutput


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sim")
    return {m: write_sim_checkpoint(root / m, m) for m in ("deepseek-v3", "llama-70b")}


# --- the cost model ------------------------------------------------------------------------------


def test_llama_70b_decode_and_prefill_rooflines(ckpts: dict[str, Path]) -> None:
    shape = ModelShape.from_path(ckpts["llama-70b"])
    attn_layer = 2 * 8192 * 64 * 128 + 2 * 8192 * 8 * 128  # q, o + k, v
    mlp_layer = 3 * 8192 * 28672
    embed = 2 * 128256 * 8192
    assert shape.total_params == 80 * (attn_layer + mlp_layer) + embed == 70_552_387_584
    assert shape.kv_bytes_per_token(1) == 80 * 2 * 8 * 128 * 2
    cm = CostModel(shape, HARDWARE["h200"])
    hbm = 4.8e12 * 0.8
    # decode, one request at 1000 tokens: memory-bound. fp8 attention weights + bf16 LM head +
    # the KV of 1000 tokens + one hidden row; the MLP's fp8 weights + in/out rows
    attn_bytes = 80 * attn_layer + 128256 * 8192 * 2 + 1000 * 327680 + 8192 * 2
    ffn_bytes = 80 * mlp_layer + 8192 * 2 * 2
    cost = cm.step([Row(1, 1000)], [1])
    assert cost.attention_s == pytest.approx(attn_bytes / hbm, rel=1e-9)
    assert cost.ffn_s == pytest.approx(ffn_bytes / hbm, rel=1e-9)
    assert cost.comm_s == 0 and cost.overhead_s == 0.002
    assert cost.total_s == pytest.approx(0.002 + (attn_bytes + ffn_bytes) / hbm, rel=1e-9)  # ~20.5 ms
    # prefill of a 2000-token prompt: compute-bound. fp8 GEMMs at 1979 TFLOP/s, the LM head and
    # the causal attention products (2000 * 2001 / 2 query-key pairs, QK and PV: 2 x 128 dims) in bf16
    fp8 = 2 * 80 * attn_layer * 2000
    bf16 = 2 * 128256 * 8192 + 2 * 80 * 64 * 256 * (2000 * 2001 / 2)
    assert cm.attention_time([Row(2000, 2000)]) == pytest.approx(fp8 / (1979e12 * 0.6) + bf16 / (989e12 * 0.6), rel=1e-9)
    assert cm.ffn_time(2000) == pytest.approx(2 * 80 * mlp_layer * 2000 / (1979e12 * 0.6), rel=1e-9)
    # a replica per H200: 141 GB x 0.88 less the weights (bf16 embeddings), over 320 KiB a token
    weights = 80 * (attn_layer + mlp_layer) + embed * 2
    assert cm.kv_pool_tokens(0.88) == int((141e9 * 0.88 - weights) // 327680)


def test_deepseek_v3_mla_moe_and_dp_attention(ckpts: dict[str, Path]) -> None:
    shape = ModelShape.from_path(ckpts["deepseek-v3"])
    mla_layer = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    assert shape.attn_params == mla_layer == 187_105_280
    assert shape.total_params / 1e9 == pytest.approx(671, rel=0.005)  # the published 671B / 37B
    assert shape.active_params / 1e9 == pytest.approx(37.5, rel=0.01)
    assert shape.kv_bytes_per_token(16) == 61 * 576 * 2  # the latent: one head, whatever attn_tp
    h20 = HARDWARE["h20"]
    dpa = CostModel(shape, h20, tp=16, attn_tp=1, dp_groups=16)
    # one decode row at 1000 tokens, this group's attention part on H20: memory-bound
    nbytes = 61 * mla_layer + 129280 * 7168 * 2 + 1000 * 70272 + 7168 * 2
    assert dpa.attention_time([Row(1, 1000)]) == pytest.approx(nbytes / (4.0e12 * 0.8), rel=1e-9)  # 4.17 ms
    # the feed-forward at 1 token: 3 dense layers + 58 shared experts + the gates, split 16 ways,
    # and the one expert of 16 local ones per layer it picks with probability 8/256
    expert = 3 * 7168 * 2048
    dense = 3 * 3 * 7168 * 18432 + 58 * expert + 58 * 256 * 7168
    ffn_bytes = (dense / 16 + 58 * 16 * (8 / 256) * expert) + 7168 * 2 * 2
    assert dpa.ffn_time(1) == pytest.approx(ffn_bytes / (4.0e12 * 0.8), rel=1e-9)
    # DP attention: the gather and scatter of 16 groups x 8 tokens over the 2-node world (IB)
    comm = 61 * 2 * (15 / 16) * (128 * 7168 * 2) / (50e9 * 0.7) + 61 * 2 * 10e-6
    assert dpa.comm_time([8] * 16) == pytest.approx(comm, rel=1e-9)
    # capacity: 16 groups each hold their own latent cache; plain TP 16 holds one copy per GPU
    tp = CostModel(shape, h20, tp=16, attn_tp=16, dp_groups=1)
    assert 16 * dpa.kv_pool_tokens(0.88) > 10 * tp.kv_pool_tokens(0.88)
    # the lockstep: another group's prefill costs this group's step too (the feed-forward runs them all)
    assert dpa.step([Row(1, 1000)], [1, 4000] + [1] * 14).total_s > 5 * dpa.step([Row(1, 1000)], [1] * 16).total_s


# --- the engine over SimRunner --------------------------------------------------------------------


def sim_engine(ckpt: Path, **flags: Any) -> Engine:
    args = ServerArgs(model_path=str(ckpt), device="sim", sim_hardware="h200", sim_time_scale=1e-6,
                      context_length=2048, **flags)
    layout = ParallelLayout.from_args(1, 1, 0, False)
    return build_sim_rank(args, layout, logging.getLogger("test")).engine


def make_req(rid: str, prompt: list[int], **sampling: Any) -> Req:
    params = {"temperature": 0.0, "max_new_tokens": 24} | sampling
    return Req(rid=rid, gateway_id="g", input_ids=list(prompt), sampling=SamplingParams(**params))


def run(engine: Engine, reqs: list[Req], abort_at: dict[int, str] | None = None) -> dict[str, TokenOutput]:
    for r in reqs:
        engine.add(r)
    done: dict[str, TokenOutput] = {}
    steps = 0
    while engine.has_work or engine.finished_early:
        if abort_at and steps in abort_at:
            engine.abort(abort_at[steps])
        for o in engine.step().outputs:
            if o.finish is not None:
                done[o.rid] = o
        engine.assert_invariants()
        steps += 1
        assert steps < 5000
    engine.assert_idle_invariants()
    return done


def workload() -> list[Req]:
    return [make_req(f"r{i}", [5 + (i * 7 + j) % 900 for j in range(30 + 37 * i)], max_new_tokens=10 + 9 * i)
            for i in range(12)]


def test_tokens_deterministic_never_eos_and_kv_accounting_holds(ckpts: dict[str, Path]) -> None:
    big = sim_engine(ckpts["llama-70b"])
    assert big.pool.size > 100_000 and big.pool.k == []  # sized from the H200's memory, no tensors
    alone = {r.rid: run(sim_engine(ckpts["llama-70b"], max_total_tokens=2048), [r])[r.rid] for r in workload()}
    small = sim_engine(ckpts["llama-70b"], max_total_tokens=700, chunked_prefill_size=64)
    together = run(small, workload())  # chunked prefill and retraction on a 700-slot pool
    assert small.decode.num_retracted > 0
    eos = set(small.cfg.eos_token_ids)
    for rid, out in alone.items():
        ids = together[rid].all_ids
        assert ids == out.all_ids, rid  # same request -> same tokens, whatever the batch
        assert out.finish is not None and out.finish.type == "length"
        assert len(ids) == int(rid[1:]) * 9 + 10
        assert not eos & set(ids) and all(4 <= t < 1000 for t in ids)
    assert alone["r0"].all_ids != alone["r1"].all_ids
    # a seed makes a different stream of the same prompt
    seeded = run(sim_engine(ckpts["llama-70b"]), [make_req("r0", workload()[0].input_ids, max_new_tokens=10, seed=7)])
    assert seeded["r0"].all_ids != alone["r0"].all_ids


def test_abort_and_resume_continue_the_same_stream(ckpts: dict[str, Path]) -> None:
    engine = sim_engine(ckpts["deepseek-v3"], max_total_tokens=4000)
    reqs = workload()[:4]
    done = run(engine, reqs, abort_at={3: "r2"})
    assert done["r2"].finish is not None and done["r2"].finish.type == "abort"
    full = done["r3"].all_ids
    assert full is not None
    # a migrated request brings its first outputs along and goes on where they end
    resumed = make_req("r3", reqs[3].input_ids, max_new_tokens=len(full))
    resumed.output_ids = list(full[:5])
    resumed.resumed = 5
    again = run(sim_engine(ckpts["deepseek-v3"], max_total_tokens=4000), [resumed])
    assert again["r3"].all_ids == full
