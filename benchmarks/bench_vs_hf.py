"""Against Hugging Face transformers `generate` with static batches: same model, same 128 requests
of mixed prompt and output lengths, greedy. HF pads each batch (left) and runs it until its
longest request is done; only the tokens each request asked for count as output.

    .venv/bin/python -m benchmarks.bench_vs_hf [--size big] [--hf-batch 32]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.bench_engine import common_args, load, make_engine, model_dir, params_count
from services.scheduler.request import Req
from shared.messages import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    d = model_dir(args)
    model, config, tok = load(d)
    rng = random.Random(0)
    cases = [
        ([rng.randrange(4, config.vocab_size) for _ in range(rng.randint(16, 256))], rng.randint(16, 128))
        for _ in range(args.requests)
    ]
    useful = sum(n for _, n in cases)

    engine = make_engine(model, config, tok, pool=65536, max_running_requests=64)
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(cases):
        engine.add(Req(f"r{i}", "g", p, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True)))
    while engine.has_work:
        assert engine.step().reqs
    ours = useful / (time.perf_counter() - t0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(cases), args.hf_batch):
            group = cases[s : s + args.hf_batch]
            width = max(len(p) for p, _ in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
            n = max(k for _, k in group)
            hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
    theirs = useful / (time.perf_counter() - t0)
    print(
        f"{params_count(model) / 1e6:.1f}M params, {args.requests} requests (prompt 16-256, output 16-128), "
        f"HF static batch {args.hf_batch}, threads={args.threads}"
    )
    print("| system | output tok/s |")
    print("| --- | ---: |")
    print(f"| dpserve engine (continuous batching, max 64 running) | {ours:.0f} |")
    print(f"| transformers generate (static batches) | {theirs:.0f} |")
    print(f"| ratio dpserve / HF | {ours / theirs:.2f} |")


if __name__ == "__main__":
    main()
