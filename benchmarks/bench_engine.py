"""Engine efficiency: served decode throughput / the raw model-forward loop's, same batch sizes.

The raw loop prefills B prompts and then calls the model on hand-built decode batches (argmax,
no scheduler); the engine serves the same B requests (greedy, ignore_eos) through Engine.step
(schedule -> forward -> update). Decode tokens/s are measured over the steps where all B
requests decode. Goal: ratio >= 0.85.

    .venv/bin/python -m benchmarks.bench_engine [--model DIR | --size big] [--batch-sizes 1,8,32,64]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from services.launcher.tiny_model import create_tiny_model
from services.scheduler.engine import Engine, EngineConfig
from services.scheduler.model import KVPool, build_forward_batch, load_model
from services.scheduler.request import Req
from shared.messages import SamplingParams

BIG = {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "num_kv_heads": 4, "intermediate_size": 3072}


def model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    d = Path(tempfile.gettempdir()) / f"dpserve-bench-{args.size}"
    if not (d / "config.json").exists():
        create_tiny_model(d, seed=0, **(BIG if args.size == "big" else {}))
    return d


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="checkpoint dir (default: a created random one)")
    ap.add_argument("--size", choices=["tiny", "big"], default="tiny", help="big: ~70M params")
    ap.add_argument("--threads", type=int, default=1)


def load(d: Path) -> tuple[torch.nn.Module, Any, Tokenizer]:
    model, config = load_model(d)
    return model, config, Tokenizer.from_file(str(d / "tokenizer.json"))


def make_engine(model: torch.nn.Module, config: Any, tok: Tokenizer, pool: int, **kw: Any) -> Engine:
    cfg = EngineConfig.from_model(
        config,
        pool,
        max_running_requests=kw.pop("max_running_requests", 128),
        prefill_budget=kw.pop("prefill_budget", 16384),
        **kw,
    )
    kv = KVPool(config.num_hidden_layers, pool, config.num_key_value_heads, config.head_dim)
    return Engine(model, kv, tok, cfg)


def params_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def raw_loop(model: torch.nn.Module, config: Any, prompts: list[list[int]], steps: int) -> float:
    """Decode tokens/s of a bare forward loop over the same pool layout."""
    b = len(prompts)
    pool = KVPool(
        config.num_hidden_layers,
        sum(map(len, prompts)) + b * (steps + 1),
        config.num_key_value_heads,
        config.head_dim,
    )
    empty = torch.empty(0, dtype=torch.long)
    slots = [pool.alloc(len(p)) for p in prompts]
    batch = build_forward_batch(prompts, [empty] * b, slots, pool)  # type: ignore[arg-type]
    last = model(batch).argmax(-1).tolist()
    kv = list(slots)
    t0 = time.perf_counter()
    for _ in range(steps):
        new = [pool.alloc(1) for _ in range(b)]
        batch = build_forward_batch([[t] for t in last], kv, new, pool)  # type: ignore[arg-type]
        last = model(batch).argmax(-1).tolist()
        kv = [torch.cat([k, n]) for k, n in zip(kv, new, strict=True)]  # type: ignore[list-item]
    return b * steps / (time.perf_counter() - t0)


def served(engine: Engine, prompts: list[list[int]], steps: int) -> float:
    """Decode tokens/s through the engine (steps in which every request decodes)."""
    for i, p in enumerate(prompts):
        engine.add(
            Req(f"r{i}", "g", p, SamplingParams(temperature=0, max_new_tokens=steps + 1, ignore_eos=True))
        )
    tokens, elapsed = 0, 0.0
    while engine.has_work:
        t0 = time.perf_counter()
        step = engine.step()
        assert step.reqs
        if step.decode_only and len(step.reqs) == len(prompts):
            elapsed += time.perf_counter() - t0
            tokens += len(step.reqs)
    engine.drain_finished_early()
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = model_dir(args)
    model, config, tok = load(d)
    print(
        f"model {d} ({params_count(model) / 1e6:.1f}M params), threads={args.threads}, decode steps={args.steps}"
    )
    print("| batch | raw forward tok/s | engine tok/s | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    rng = random.Random(0)
    for b in map(int, args.batch_sizes.split(",")):
        prompts = [[rng.randrange(4, config.vocab_size) for _ in range(args.prompt_len)] for _ in range(b)]
        raw_loop(model, config, prompts[:1], 2)  # warm-up
        raw = ours = 0.0
        for _ in range(args.repeat):  # interleaved, best of: the machine is shared
            raw = max(raw, raw_loop(model, config, prompts, args.steps))
            pool = b * (args.prompt_len + args.steps + 2)
            ours = max(ours, served(make_engine(model, config, tok, pool=pool), prompts, args.steps))
        print(f"| {b} | {raw:.0f} | {ours:.0f} | {ours / raw:.2f} |", flush=True)


if __name__ == "__main__":
    main()
