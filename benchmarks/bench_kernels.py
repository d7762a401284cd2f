"""Triton kernels vs the torch path on a CUDA device, plus decode throughput of a DeepSeek-V2-Lite
shaped model with random weights.

  .venv/bin/python benchmarks/bench_kernels.py [--dtype bfloat16] [--layers 27] [--skip-e2e]

Prints, per kernel and shape: torch time, triton time (median of CUDA-event timings), speedup,
max relative error vs the kernel's reference, and the triton kernel's achieved bandwidth (bytes it
must move at least / time) as a share of the measured peak (a 1 GiB device-to-device copy).
Then tokens/s of batched decode steps of the whole model. Without a CUDA device it says so and
exits 0: the kernels are checked on the CPU by tests/unit/test_kernels_*.py instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cuda_time_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() / ms / 1e6  # read + write


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()


def torch_paged_attention(q, k_cache, v_cache, qo, kv, idx, scale):  # noqa: ANN001, ANN201
    """What TorchAttentionBackend does: gather each request's K/V, one causal SDPA per request."""
    out = torch.empty(q.shape[0], q.shape[1], v_cache.shape[2], dtype=q.dtype, device=q.device)
    group = q.shape[1] // k_cache.shape[1]
    qo_l, kv_l = qo.tolist(), kv.tolist()
    for b in range(len(qo_l) - 1):
        e, s = qo_l[b + 1] - qo_l[b], kv_l[b + 1] - kv_l[b]
        ids = idx[kv_l[b] : kv_l[b + 1]]
        ki = k_cache[ids].transpose(0, 1).repeat_interleave(group, 0)
        vi = v_cache[ids].transpose(0, 1).repeat_interleave(group, 0)
        mask = None
        if e > 1:
            mask = torch.arange(s, device=q.device)[None, :] <= (s - e + torch.arange(e, device=q.device))[:, None]
        oi = F.scaled_dot_product_attention(q[qo_l[b] : qo_l[b + 1]].transpose(0, 1), ki, vi, attn_mask=mask, scale=scale)
        out[qo_l[b] : qo_l[b + 1]] = oi.transpose(0, 1)
    return out


def kernel_rows(dtype: torch.dtype, peak: float) -> list[tuple]:
    from services.scheduler.kernels import decode_attention as da
    from services.scheduler.kernels import extend_attention as ea
    from services.scheduler.kernels import mla_decode as md
    from services.scheduler.kernels import moe
    from services.scheduler.kernels import rmsnorm as rn
    from services.scheduler.kernels import rotary as ro
    from services.scheduler.kernels.paged import indptr_from_lens

    dev, esize = "cuda", torch.empty(0, dtype=dtype).element_size()
    rows: list[tuple] = []

    def add(name: str, shape: str, torch_fn, triton_fn, ref, nbytes: int) -> None:  # noqa: ANN001
        out = triton_fn()
        err = rel_err(out[0] if isinstance(out, tuple) else out, ref)
        t_torch, t_triton = cuda_time_ms(torch_fn), cuda_time_ms(triton_fn)
        gbs = nbytes / t_triton / 1e6
        rows.append((name, shape, t_torch, t_triton, t_torch / t_triton, err, gbs, 100 * gbs / peak))

    for batch, ctx in ((32, 1024), (128, 2048)):  # Llama-8B-like GQA decode: 32 q heads, 8 kv heads, d 128
        h, kvh, d = 32, 8, 128
        pool = batch * ctx
        kc, vc = (torch.randn(pool, kvh, d, device=dev, dtype=dtype) for _ in range(2))
        q = torch.randn(batch, h, d, device=dev, dtype=dtype)
        kv, qo = indptr_from_lens([ctx] * batch, dev), indptr_from_lens([1] * batch, dev)
        idx = torch.randperm(pool, device=dev)
        ref = da.decode_attention_ref(q, kc, vc, kv, idx, d**-0.5)
        add("decode_attention", f"B={batch} ctx={ctx} H={h}/{kvh} d={d}",
            lambda: torch_paged_attention(q, kc, vc, qo, kv, idx, d**-0.5),  # noqa: B023
            lambda: da.decode_attention(q, kc, vc, kv, idx, d**-0.5),  # noqa: B023
            ref, 2 * pool * kvh * d * esize + pool * 8)

    for batch, ctx in ((32, 1024), (128, 2048)):  # DeepSeek-V2-Lite MLA: 16 heads, latent 512 + rope 64
        h, c, r = 16, 512, 64
        pool = batch * ctx
        cache = torch.randn(pool, 1, c + r, device=dev, dtype=dtype)
        ql, qr = torch.randn(batch, h, c, device=dev, dtype=dtype), torch.randn(batch, h, r, device=dev, dtype=dtype)
        kv, idx = indptr_from_lens([ctx] * batch, dev), torch.randperm(pool, device=dev)
        ref = md.mla_decode_ref(ql, qr, cache, kv, idx, 192**-0.5)

        def mla_torch(ql=ql, qr=qr, cache=cache, kv=kv, idx=idx, c=c):  # noqa: ANN001, ANN202
            # The torch path: one latent "kv head" shared by all heads, as SDPA with Dk=576, Dv=512.
            q = torch.cat([ql, qr], -1)
            qo = indptr_from_lens([1] * q.shape[0], q.device)
            return torch_paged_attention(q, cache, cache[:, :, :c], qo, kv, idx, 192**-0.5)

        add("mla_decode", f"B={batch} ctx={ctx} H={h} c={c} r={r}", mla_torch,
            lambda: md.mla_decode(ql, qr, cache, kv, idx, 192**-0.5),  # noqa: B023
            ref, pool * (c + r) * esize + pool * 8)

    for ext, pre in (((512,) * 8, (0,) * 8), ((256,) * 8, (1536,) * 8)):
        h, kvh, d = 32, 8, 128
        seq = [e + p for e, p in zip(ext, pre, strict=True)]
        pool = sum(seq)
        kc, vc = (torch.randn(pool, kvh, d, device=dev, dtype=dtype) for _ in range(2))
        q = torch.randn(sum(ext), h, d, device=dev, dtype=dtype)
        qo, kv, idx = indptr_from_lens(ext, dev), indptr_from_lens(seq, dev), torch.randperm(pool, device=dev)
        ref = torch_paged_attention(q, kc, vc, qo, kv, idx, d**-0.5)
        add("extend_attention", f"B=8 ext={ext[0]} prefix={pre[0]} H={h}/{kvh} d={d}",
            lambda: torch_paged_attention(q, kc, vc, qo, kv, idx, d**-0.5),  # noqa: B023
            lambda: ea.extend_attention(q, kc, vc, qo, kv, idx, max(ext), d**-0.5),  # noqa: B023
            ref, 2 * pool * kvh * d * esize + 2 * q.numel() * esize)

    for tokens in (16, 256, 2048):  # DeepSeek-V2-Lite MoE layer: 64 experts, top 6, hidden 2048, inter 1408
        e, k, hid, inter = 64, 6, 2048, 1408
        x = torch.randn(tokens, hid, device=dev, dtype=dtype)
        w13 = torch.randn(e, 2 * inter, hid, device=dev, dtype=dtype) * hid**-0.5
        w2 = torch.randn(e, hid, inter, device=dev, dtype=dtype) * inter**-0.5
        ids = torch.stack([torch.randperm(e, device=dev)[:k] for _ in range(tokens)])
        wts = torch.rand(tokens, k, device=dev).softmax(-1)
        ref = moe.fused_moe_ref(x, w13, w2, wts, ids)
        touched = int(ids.unique().numel())
        add("fused_moe", f"T={tokens} E={e} top{k} h={hid} i={inter}",
            lambda: moe.fused_moe_ref(x, w13, w2, wts, ids),  # noqa: B023
            lambda: moe.fused_moe(x, w13, w2, wts, ids),  # noqa: B023
            ref, touched * 3 * inter * hid * esize)

    for tokens, hid in ((128, 2048), (8192, 4096)):
        x, res = torch.randn(tokens, hid, device=dev, dtype=dtype), torch.randn(tokens, hid, device=dev, dtype=dtype)
        w = torch.randn(hid, device=dev, dtype=dtype)
        ref = rn.fused_add_rmsnorm_ref(x, w, 1e-6, res)[0]
        add("fused_add_rmsnorm", f"T={tokens} D={hid}",
            lambda: rn.fused_add_rmsnorm_ref(x, w, 1e-6, res),  # noqa: B023
            lambda: rn.fused_add_rmsnorm(x, w, 1e-6, res),  # noqa: B023
            ref, 4 * x.numel() * esize)

    for tokens in (128, 8192):
        h, kvh, d = 32, 8, 128
        pos = torch.randint(0, 4096, (tokens,), device=dev)
        q, kk = torch.randn(tokens, h, d, device=dev, dtype=dtype), torch.randn(tokens, kvh, d, device=dev, dtype=dtype)
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev).float() / d))
        ref = ro.rotary_ref(pos, q, kk, inv)[0]
        add("rotary", f"T={tokens} H={h}/{kvh} d={d}",
            lambda: ro.rotary_ref(pos, q, kk, inv),  # noqa: B023
            lambda: ro.rotary_embedding(pos, q, kk, inv),  # noqa: B023
            ref, 2 * (q.numel() + kk.numel()) * esize)
    return rows


V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1,
    "topk_group": 1, "scoring_func": "softmax", "norm_topk_prob": False, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "head_dim": 64, "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "attention_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """ms of one call: CUDA events on a GPU, the wall clock elsewhere."""
    if device == "cuda":
        def cuda_ms(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return cuda_ms

    def wall_ms(fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1000
    return wall_ms


def e2e_decode(
    config_json: dict, dtype: torch.dtype, device: str, backend: str,
    batches: tuple[int, ...], ctx: int, steps: int,
) -> list[tuple]:
    """(backend, layers, batch, ctx, step ms, tokens/s) per batch size: batched decode steps of the
    whole model with random weights over a random cached context, on the torch or the Triton path
    (`install_attention_backend`, as the scheduler does for --attention-backend)."""
    from services.scheduler.model.attention_backends import install_attention_backend
    from services.scheduler.model.batch import build_forward_batch
    from services.scheduler.model.config import ModelConfig
    from services.scheduler.model.mla_pool import make_kv_pool
    from services.scheduler.model.registry import get_model_class

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config_json))
        config = ModelConfig.from_hf(Path(d))
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = get_model_class(config.architecture)(config).eval()  # random weights, default init
    finally:
        torch.set_default_dtype(old)
    install_attention_backend(model, backend, device)
    timed = _timer(device)
    rows = []
    for batch in batches:
        pool = make_kv_pool(config, batch * (ctx + steps) + 1, dtype, device)
        prefix = [pool.alloc(ctx) for _ in range(batch)]  # the cached context: random latent rows
        for layer in getattr(pool, "kv", []):
            layer.normal_()
        g = torch.Generator().manual_seed(batch)
        ms: list[float] = []
        with torch.inference_mode():
            for step in range(steps):
                new = [pool.alloc(1) for _ in range(batch)]
                toks = torch.randint(0, config.vocab_size, (batch, 1), generator=g).tolist()
                fb = build_forward_batch(toks, prefix, new, pool, device=device)
                took = timed(lambda fb=fb: model(fb))
                if step >= min(2, steps - 1):  # the first steps warm up (Triton compiles)
                    ms.append(took)
                prefix = [torch.cat([p, n]) for p, n in zip(prefix, new, strict=True)]
        step_ms = statistics.median(ms)
        rows.append((backend, config.num_hidden_layers, batch, ctx, step_ms, batch * 1000 / step_ms))
        del pool
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def dp_attention_capacity(config_json: dict, dtype: torch.dtype, world: int, kv_gib_per_rank: float) -> list[tuple]:
    """(layout, KV tokens in all) for `world` ranks with the same KV byte budget each: plain TP holds
    the one latent cache replicated on every rank; DP attention (dp = world) gives each rank its
    own group's cache. What DP attention is for with MLA: `world` times the tokens."""
    from services.scheduler.model.config import ModelConfig
    from services.scheduler.model.mla_pool import kv_bytes_per_token

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(config_json))
        config = ModelConfig.from_hf(Path(d))
    per_rank = int(kv_gib_per_rank * 2**30 // kv_bytes_per_token(config, dtype))
    return [(f"tp {world}", per_rank), (f"tp {world} dp {world} DP attention", per_rank * world)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--layers", type=int, default=27, help="decoder layers of the e2e model (V2-Lite: 27)")
    ap.add_argument("--ctx", type=int, default=1024, help="cached context per request in the e2e test")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--kv-gib-per-rank", type=float, default=40.0, help="KV budget per rank for the capacity table")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here; nothing to time. The kernels are checked on the CPU "
              "by `pytest tests/unit/test_kernels_*.py` (Triton interpreter). Run this on a GPU machine.")
        return 0
    dtype = getattr(torch, args.dtype)
    print(f"device: {torch.cuda.get_device_name()}, dtype {args.dtype}, torch {torch.__version__}")
    peak = peak_bandwidth_gbs()
    print(f"measured peak bandwidth (1 GiB device-to-device copy): {peak:.0f} GB/s\n")
    print("| kernel | shape | torch ms | triton ms | speedup | max rel err | triton GB/s | % of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, shape, tt, tk, sp, err, gbs, pct in kernel_rows(dtype, peak):
        print(f"| {name} | {shape} | {tt:.3f} | {tk:.3f} | {sp:.2f}x | {err:.1e} | {gbs:.0f} | {pct:.0f}% |")
    if args.skip_e2e:
        return 0
    config_json = V2_LITE | {"num_hidden_layers": args.layers}
    print("\nEnd-to-end decode, DeepSeek-V2-Lite shapes, random weights, one GPU: the torch path vs the")
    print("Triton path (MLA decode, grouped MoE, fused norm, rotary), as --attention-backend picks them")
    print("| backend | layers | batch | ctx | step ms | tokens/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    try:
        for backend in ("torch", "triton"):
            for row in e2e_decode(config_json, dtype, "cuda", backend, (1, 16, 64), args.ctx, args.steps):
                name, layers, batch, ctx, step_ms, tps = row
                print(f"| {name} | {layers} | {batch} | {ctx} | {step_ms:.1f} | {tps:.0f} |")
    except Exception as exc:  # report, don't hide the kernel table
        print(f"e2e decode failed: {type(exc).__name__}: {exc}")
        return 1
    world = torch.cuda.device_count()
    print(f"\nKV capacity with and without DP attention ({args.kv_gib_per_rank:g} GiB of KV per rank, {args.layers} layers)")
    print("| layout | KV tokens |")
    print("| --- | --- |")
    for layout, tokens in dp_attention_capacity(config_json, dtype, max(world, 2), args.kv_gib_per_rank):
        print(f"| {layout} | {tokens} |")
    if world < 2:
        print("DP attention throughput needs one rank per GPU (NCCL); this machine has one GPU. Through "
              "the server: `dpserve serve --tp-size 2 --dp-size 2 --enable-dp-attention` on >= 2 GPUs, "
              "or benchmarks/bench_dpa.py (gloo, tiny model) on the CPU.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
