"""The engine driven step by step on the tiny model: chunked prefill, radix cache, retraction,
abort, accounting. Greedy outputs are compared across configurations of the same model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer

from services.detokenizer import IncrementalDecoder, detokenize_batch
from services.scheduler import engine as engine_module
from services.scheduler.engine import Engine, EngineConfig
from services.scheduler.model import KVPool, load_model
from services.scheduler.request import Req
from shared.messages import SamplingParams, TextBatch, TextOutput, TokenBatch, TokenOutput


class Rig:
    def __init__(self, model_dir: Path) -> None:
        self.model, self.config = load_model(model_dir)
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def engine(
        self, pool: int = 4096, max_running_requests: int = 16, prefill_budget: int = 16384, **kw: Any
    ) -> Engine:
        c = self.config
        cfg = EngineConfig.from_model(
            c, pool, max_running_requests=max_running_requests, prefill_budget=prefill_budget, **kw
        )
        kv = KVPool(c.num_hidden_layers, pool, c.num_key_value_heads, c.head_dim)
        return Engine(self.model, kv, self.tokenizer, cfg)


def make_req(rid: str, prompt: list[int], **sampling: Any) -> Req:
    params = {"temperature": 0.0, "ignore_eos": True, "max_new_tokens": 8} | sampling
    return Req(rid=rid, gateway_id="g", input_ids=list(prompt), sampling=SamplingParams(**params))


def run(engine: Engine, reqs: list[Req], on_step: Any = None) -> dict[str, TokenOutput]:
    """Drives the engine until idle, checking the accounting at every step boundary."""
    for r in reqs:
        engine.add(r)
    done: dict[str, TokenOutput] = {}
    steps = 0
    while engine.has_work or engine.finished_early:
        for o in engine.step().outputs:
            if o.finish is not None:
                done[o.rid] = o
        engine.assert_invariants()
        steps += 1
        if on_step is not None:
            on_step(engine, steps)
        assert steps < 10_000
    engine.assert_idle_invariants()
    return done


def prompts(n: int, seed: int, lo: int = 1, hi: int = 200) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 1000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def workload(seed: int = 0) -> list[Req]:
    ps = prompts(5, seed, 1, 150)
    shared = prompts(1, seed + 1, 100, 100)[0]
    ps += [shared + p[:20] for p in prompts(3, seed + 2)]
    rng = random.Random(seed)
    return [make_req(f"r{i}", p, max_new_tokens=rng.choice([1, 5, 12, 24])) for i, p in enumerate(ps)]


def ids(done: dict[str, TokenOutput]) -> dict[str, list[int]]:
    return {rid: list(o.all_ids or []) for rid, o in done.items()}


@pytest.fixture(scope="module")
def reference(rig: Rig) -> dict[str, list[int]]:
    """Each request alone, no cache, no chunking: the output everything else must equal."""
    out: dict[str, list[int]] = {}
    for r in workload():
        done = run(rig.engine(chunked_prefill_size=-1, disable_radix_cache=True), [r])
        out.update(ids(done))
    return out


@pytest.mark.parametrize("chunk", [16, 64, -1])
@pytest.mark.parametrize("radix", [True, False])
def test_same_greedy_output_chunked_and_cached(rig: Rig, reference: dict, chunk: int, radix: bool) -> None:
    engine = rig.engine(chunked_prefill_size=chunk, disable_radix_cache=not radix)
    chunked_steps = []
    done = run(engine, workload(), lambda e, s: chunked_steps.append(e.prefill.chunked is not None))
    assert ids(done) == reference
    assert all(o.finish is not None and o.finish.type == "length" for o in done.values())
    assert any(chunked_steps) == (chunk in (16, 64))  # 200-token prompts really went in pieces
    if radix:
        again = run(engine, workload())  # the same prompts again: now largely from the cache
        assert ids(again) == reference
        assert engine.cache.cached_size > 0  # finished requests stay cached
        assert min(o.cached_tokens for o in again.values() if o.prompt_tokens > 1) > 0
    else:
        assert engine.cache.hit_tokens == 0 and engine.pool.num_free == engine.pool.size


def test_chunked_prefill_size_bounds_the_whole_step(rig: Rig) -> None:
    """SGLang's meaning of --chunked-prefill-size: the prompt tokens of one step together, not each
    request's chunk; the request that crosses the budget is cut and goes on first next step."""
    engine = rig.engine(chunked_prefill_size=24)
    reqs = [make_req(f"r{i}", p, max_new_tokens=2) for i, p in enumerate(prompts(3, 11, 10, 10))]
    for r in reqs:
        engine.add(r)
    first = engine.step()
    assert first.num_tokens == 24 and [r.rid for r in first.reqs] == ["r0", "r1", "r2"]
    assert engine.prefill.chunked is reqs[2] and reqs[2].cached_len == 4 and reqs[2].extend_len == 6
    second = engine.step()  # r0 and r1 decode; r2's last 6 prompt tokens
    assert second.num_tokens == 2 + 6 and engine.prefill.chunked is None


def test_shared_prefix_reports_cached_tokens(rig: Rig) -> None:
    prefix = prompts(1, 5, 100, 100)[0]
    a, b = prefix + [11, 12, 13], prefix + [21, 22]
    engine = rig.engine()
    first = run(engine, [make_req("a", a, max_new_tokens=12)])
    second = run(engine, [make_req("b", b, max_new_tokens=12)])
    assert first["a"].cached_tokens == 0
    assert second["b"].cached_tokens >= 96
    off = run(rig.engine(disable_radix_cache=True), [make_req("b", b, max_new_tokens=12)])
    assert second["b"].all_ids == off["b"].all_ids and off["b"].cached_tokens == 0


def test_retraction_keeps_greedy_output(rig: Rig, reference: dict) -> None:
    reqs = workload()
    need = max(r.max_len for r in reqs)
    for radix in (True, False):
        engine = rig.engine(pool=need + 8, chunked_prefill_size=64, disable_radix_cache=not radix)
        done = run(engine, workload())
        assert engine.decode.num_retracted > 0, "the pool was meant to be too small"
        assert ids(done) == reference


def test_lpm_policy_same_output(rig: Rig, reference: dict) -> None:
    engine = rig.engine(schedule_policy="lpm", max_running_requests=2)
    assert ids(run(engine, workload())) == reference


def test_abort_everywhere_frees_kv(rig: Rig) -> None:
    engine = rig.engine(chunked_prefill_size=16, max_running_requests=2)
    long = prompts(3, 9, 150, 150)
    reqs = [make_req(f"x{i}", p, max_new_tokens=50) for i, p in enumerate(long)]
    for r in reqs:
        engine.add(r)
    assert engine.step().reqs
    assert engine.prefill.chunked is reqs[0] and engine.kv_used > 0  # mid-prompt
    # run x0 into decode, then abort it while running; x1 mid-prefill; x2 waiting
    while not engine.running:
        assert engine.step().reqs
    assert engine.abort("x0") is reqs[0]
    engine.assert_invariants()
    assert engine.abort("x2") is reqs[2] and engine.abort("nope") is None
    step = engine.step()
    assert step.reqs
    outs = step.outputs  # reports the aborts so far
    assert engine.prefill.chunked is reqs[1]
    assert engine.abort("x1") is reqs[1]
    outs += engine.drain_finished_early()
    assert sorted(o.rid for o in outs) == ["x0", "x1", "x2"]
    assert all(o.finish is not None and o.finish.type == "abort" for o in outs)
    assert engine.kv_used == 0 and not engine.has_work
    engine.assert_idle_invariants()


def test_bad_requests_end_with_clear_errors(rig: Rig) -> None:
    engine = rig.engine(pool=256)
    done = run(
        engine,
        [
            make_req("big", [5] * 300, max_new_tokens=100),  # the prompt alone overflows the pool
            make_req("vocab", [10**6]),
            make_req("zero", [5], max_new_tokens=0),
        ],
    )
    assert done["big"].finish.type == "abort" and "capacity" in done["big"].finish.message  # type: ignore[union-attr]
    assert done["vocab"].finish.type == "abort"  # type: ignore[union-attr]
    assert done["zero"].finish == done["zero"].finish.__class__(type="length", length=0)  # type: ignore[union-attr]


def test_stop_token_and_min_new_tokens(rig: Rig) -> None:
    p = prompts(1, 3, 30, 30)[0]
    base = run(rig.engine(), [make_req("a", p, max_new_tokens=10)])["a"].all_ids
    assert base is not None
    stop = base[3]
    first = base.index(stop)
    got = run(rig.engine(), [make_req("b", p, max_new_tokens=10, stop_token_ids=[stop])])["b"]
    assert got.all_ids == base[: first + 1]
    assert got.finish is not None and (got.finish.type, got.finish.matched) == ("stop", stop)
    late = run(rig.engine(), [make_req("c", p, max_new_tokens=10, stop_token_ids=[stop], min_new_tokens=first + 2)])
    assert late["c"].all_ids is not None and stop not in late["c"].all_ids[: first + 2]


def test_seed_same_output_whatever_the_batch(rig: Rig) -> None:
    p = prompts(1, 4, 20, 20)[0]
    sampling = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_new_tokens": 16}
    alone = run(rig.engine(), [make_req("s", p, **sampling)])["s"].all_ids
    others = [make_req(f"o{i}", q, temperature=0.8, max_new_tokens=20) for i, q in enumerate(prompts(6, 8))]
    mixed = run(rig.engine(chunked_prefill_size=16), [*others, make_req("s", p, **sampling)])["s"].all_ids
    assert alone == mixed
    other_seed = run(rig.engine(), [make_req("s", p, **(sampling | {"seed": 99}))])["s"].all_ids
    assert other_seed != alone


def test_random_workload_accounting(rig: Rig) -> None:
    """Random arrivals, aborts and sizes on a small pool: accounting holds at every step."""
    rng = random.Random(3)
    engine = rig.engine(pool=600, chunked_prefill_size=32, max_running_requests=6)
    pending = [make_req(f"q{i}", p, max_new_tokens=rng.randint(1, 60)) for i, p in enumerate(prompts(30, 11, 1, 120))]
    finished: set[str] = set()
    while pending or engine.has_work:
        if pending and rng.random() < 0.5:
            engine.add(pending.pop())
        if rng.random() < 0.05 and (engine.running or engine.waiting):
            victim = rng.choice(engine.running + engine.waiting)
            engine.abort(victim.rid)
        finished |= {o.rid for o in engine.step().outputs if o.finish is not None}
        engine.assert_invariants()
    finished |= {o.rid for o in engine.drain_finished_early()}
    assert len(finished) == 30
    engine.assert_idle_invariants()
    torch.testing.assert_close(torch.tensor(engine.kv_used), torch.tensor(0))


def test_logprobs_match_direct_computation(rig: Rig, tiny_model: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    p = prompts(1, 21, 40, 40)[0]
    engine = rig.engine(chunked_prefill_size=16)
    run(engine, [make_req("warm", p[:30], max_new_tokens=2)])  # a cached prefix must not hide logprobs
    r = make_req("lp", p, max_new_tokens=6)
    r.return_logprob, r.top_logprobs_num, r.logprob_start_len = True, 3, 5
    out = run(engine, [r])["lp"]
    assert out.all_ids is not None and out.input_token_logprobs is not None
    full = p + out.all_ids
    with torch.inference_mode():
        lp = torch.log_softmax(hf(torch.tensor([full])).logits[0].float(), -1)
    expect_in = [(float(lp[i - 1, p[i]]), p[i]) for i in range(5, len(p))]
    assert [t for _, t in out.input_token_logprobs] == [t for _, t in expect_in]
    torch.testing.assert_close(
        torch.tensor([v for v, _ in out.input_token_logprobs]), torch.tensor([v for v, _ in expect_in]), atol=1e-4, rtol=0
    )
    assert out.output_token_logprobs is not None and out.output_top_logprobs is not None
    for k, (v, t) in enumerate(out.output_token_logprobs):
        row = lp[len(p) - 1 + k]
        assert t == out.all_ids[k] == int(row.argmax())
        assert abs(v - float(row[t])) < 1e-4
        assert [i for _, i in out.output_top_logprobs[k]] == row.topk(3).indices.tolist()
    assert out.input_top_logprobs is not None and len(out.input_top_logprobs) == len(expect_in)
    # logprob_start_len 0: token 0 has no logprob
    r0 = make_req("lp0", p[:10], max_new_tokens=1)
    r0.return_logprob, r0.logprob_start_len = True, 0
    first = run(engine, [r0])["lp0"].input_token_logprobs
    assert first is not None and first[0] == (None, p[0]) and len(first) == 10
    # max_new_tokens 0 (prompt scoring): the same prompt logprobs, nothing generated, KV returned
    scored = make_req("score", p[:10], max_new_tokens=0)
    scored.return_logprob, scored.logprob_start_len = True, 0
    out0 = run(engine, [scored])["score"]
    assert out0.input_token_logprobs == first and out0.all_ids == [] and out0.completion_tokens == 0
    assert out0.finish is not None and (out0.finish.type, out0.finish.length) == ("length", 0)
    # without logprobs there is nothing to compute: it ends at once
    nothing = run(engine, [make_req("nothing", p[:10], max_new_tokens=0)])["nothing"]
    assert nothing.all_ids == [] and nothing.input_token_logprobs is None


# --- max_new_tokens clamped to the room left; no_stop_trim through the detokenizer -------------


def test_max_new_tokens_clamped_to_pool_and_context(rig: Rig) -> None:
    """max_new_tokens beyond what the rank can ever give (a chat without max_tokens gets the rest of
    the context) is clamped at admission to min(context - prompt, pool - prompt): the request runs
    and ends with finish_reason length there."""
    huge = 10**9
    p = prompts(1, 31, 20, 20)[0]
    for pool, context, room in ((64, 0, 44), (4096, 48, 28), (64, 40, 20)):
        engine = rig.engine(pool=pool, context_length=context, chunked_prefill_size=16)
        done = run(engine, [make_req("r", p, max_new_tokens=huge, min_new_tokens=huge - 1)])["r"]
        assert done.finish is not None and (done.finish.type, done.finish.length) == ("length", room)
        assert done.all_ids is not None and len(done.all_ids) == done.completion_tokens == room
    # the clamped output is the unclamped one, cut where the room ends
    ample = run(rig.engine(), [make_req("r", p, max_new_tokens=44)])["r"].all_ids
    assert run(rig.engine(pool=64), [make_req("r", p, max_new_tokens=huge)])["r"].all_ids == ample
    # the sampling params a message brought are not edited in place (a batch may share them)
    shared = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=huge)
    req = Req(rid="s", gateway_id="g", input_ids=list(p), sampling=shared)
    run(rig.engine(pool=64), [req])
    assert shared.max_new_tokens == huge and req.sampling.max_new_tokens == 44


def test_clamped_requests_share_a_small_pool(rig: Rig) -> None:
    """Several clamped requests on one small pool: retraction, not an abort, makes room; each ends
    at its own room with the output it has alone."""
    ps = prompts(3, 32, 8, 24)
    alone = {f"c{i}": run(rig.engine(pool=64), [make_req(f"c{i}", q, max_new_tokens=10**6)])[f"c{i}"] for i, q in enumerate(ps)}
    engine = rig.engine(pool=64, chunked_prefill_size=16)
    together = run(engine, [make_req(f"c{i}", q, max_new_tokens=10**6) for i, q in enumerate(ps)])
    assert engine.decode.num_retracted > 0
    for i, q in enumerate(ps):
        out = together[f"c{i}"]
        assert out.finish is not None and (out.finish.type, out.finish.length) == ("length", 64 - len(q))
        assert out.all_ids == alone[f"c{i}"].all_ids


def test_prompt_without_room_is_an_error(rig: Rig) -> None:
    done = run(
        rig.engine(pool=64),
        [
            make_req("over", [5] * 65, max_new_tokens=1),
            make_req("full", [5] * 64, max_new_tokens=1),
            make_req("full0", [5] * 64, max_new_tokens=0),
        ],
    )
    for rid in ("over", "full"):
        finish = done[rid].finish
        assert finish is not None and finish.type == "abort" and finish.message is not None
        assert "capacity of 64 tokens" in finish.message
    assert done["full0"].finish is not None and (done["full0"].finish.type, done["full0"].finish.length) == ("length", 0)


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_no_stop_trim_reaches_the_text(rig: Rig, tiny_model: Path, no_stop_trim: bool) -> None:
    """A stop token's text is trimmed from the streamed and the final text (SGLang's default), kept
    with no_stop_trim; the ids keep it either way."""
    decoder = IncrementalDecoder(tiny_model / "tokenizer.json")
    p = prompts(1, 3, 30, 30)[0]
    base = run(rig.engine(), [make_req("a", p, max_new_tokens=10)])["a"].all_ids
    assert base is not None
    stop = base[3]
    assert not decoder.is_special(stop)
    cut = base[: base.index(stop) + 1]
    expect = rig.tokenizer.decode(cut if no_stop_trim else cut[:-1])
    for stream in (False, True):
        req = make_req("b", p, max_new_tokens=10, stop_token_ids=[stop], no_stop_trim=no_stop_trim)
        req.stream = stream
        engine = rig.engine()
        engine.add(req)
        texts: list[TextOutput] = []
        while engine.has_work:
            batch = TokenBatch(dp_rank=0, outputs=engine.step().outputs)
            for item in detokenize_batch(batch, decoder).get("g", TextBatch()).outputs:
                assert isinstance(item, TextOutput)
                texts.append(item)
            engine.assert_invariants()
        final = texts[-1]
        assert final.finish is not None and final.finish.matched == stop
        assert final.full_text == "".join(t.text for t in texts) == expect
        assert [i for t in texts for i in t.new_ids] == cut


def test_idle_check_scans_the_allocator_only_on_pools_it_can_afford(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = rig.engine(pool=512)
    run(engine, [make_req("a", [5, 6, 7])])
    scans: list[int] = []
    monkeypatch.setattr(engine.pool, "assert_invariants", lambda: scans.append(engine.pool.size))
    engine.assert_idle_invariants()
    monkeypatch.setattr(engine_module, "FULL_POOL_CHECK_MAX", 511)  # the pool is now "large"
    engine.assert_idle_invariants()
    assert scans == [512]  # the O(size) scan ran once, on the pool within the limit
