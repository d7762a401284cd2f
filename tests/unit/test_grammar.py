"""Structured outputs on the tiny random model: whatever the weights, a constrained request's output
parses and validates; the mask touches only constrained rows; grammars compile once per rank; a bad
constraint is refused with xgrammar's reason; retraction, chunked prefill and migration keep the
grammar state."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
import xgrammar as xgr

from services.scheduler.cpu import load_apply_token_bitmask
from services.scheduler.grammar import TokenMasks, json_schema_for_xgrammar
from services.scheduler.request import Req
from services.tokenizer.tokenize import TextTokenizer
from services.tokenizer.validate import validate
from shared.messages import GenerateRequest, RequestError, SamplingParams, TokenizedRequest
from tests.structured import MAX_NEW_TOKENS, check_json, check_regex, random_regex, random_schema
from tests.unit.test_engine import Rig, make_req, prompts, run, workload

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
}


def constrained(rid: str, prompt: list[int], seed: int, **constraint: str) -> Req:
    return make_req(rid, prompt, temperature=1.0, ignore_eos=False, max_new_tokens=MAX_NEW_TOKENS, seed=seed, **constraint)


def text_of(rig: Rig, out: Any) -> str:
    return rig.tokenizer.decode(out.all_ids, skip_special_tokens=True)


def test_random_schemas_and_regexes_always_validate(rig: Rig) -> None:
    """60 random schemas and 20 random regexes sampled at temperature 1 from random weights, in one
    batch with unconstrained requests: every output is complete and valid, and the unconstrained
    requests decode exactly as they do alone."""
    rng = random.Random(7)
    cases: list[tuple[str, Any]] = [("json_schema", random_schema(rng)) for _ in range(60)]
    cases += [("regex", random_regex(rng)) for _ in range(20)]
    reqs = [
        constrained(f"c{i}", [5, 6, 7 + i % 50], i, **{kind: json.dumps(c) if kind == "json_schema" else c})
        for i, (kind, c) in enumerate(cases)
    ]
    free = workload()
    alone = run(rig.engine(), workload())
    done = run(rig.engine(max_running_requests=128), reqs + free)
    for i, (kind, c) in enumerate(cases):
        out = done[f"c{i}"]
        assert out.finish is not None and out.finish.type == "stop", (c, out.finish)
        (check_json if kind == "json_schema" else check_regex)(text_of(rig, out), c)
    assert {r.rid: done[r.rid].all_ids for r in free} == {rid: o.all_ids for rid, o in alone.items()}


def test_a_grammar_compiles_once_per_rank(rig: Rig) -> None:
    engine = rig.engine()
    reqs = [constrained(f"p{i}", [5, 6, 7], i, json_schema=json.dumps(PERSON)) for i in range(3)]
    reqs.append(constrained("r", [5, 6], 0, regex="(yes|no)"))
    done = run(engine, reqs)
    assert engine.grammars.compiles == 2
    for i in range(3):
        check_json(text_of(rig, done[f"p{i}"]), PERSON)
    assert text_of(rig, done["r"]) in ("yes", "no")
    run(engine, [constrained("again", [9], 3, json_schema=json.dumps(PERSON))])
    assert engine.grammars.compiles == 2


def test_ebnf(rig: Rig) -> None:
    grammar = 'root ::= "(" item ("," item){0,3} ")"\nitem ::= [0-9] | "x"'
    done = run(rig.engine(), [constrained(f"e{i}", [5, 6], i, ebnf=grammar) for i in range(4)])
    for i in range(4):
        check_regex(text_of(rig, done[f"e{i}"]), r"\(([0-9]|x)(,([0-9]|x)){0,3}\)")


@pytest.mark.parametrize(
    ("kind", "source", "reason"),
    [
        ("json_schema", '{"type": "objec', "invalid json_schema: Failed to parse JSON"),
        ("regex", "[a-z]+(", "invalid regex: Regex parsing error at position 8"),
        ("ebnf", "root ::= x", 'invalid ebnf: EBNF parser error at line 1, column 10: Rule "x" is not defined'),
    ],
)
def test_a_bad_constraint_is_refused_with_its_reason(rig: Rig, kind: str, source: str, reason: str) -> None:
    engine = rig.engine()
    engine.grammars.prepare([(kind, source)])
    engine.grammars.prepare([(kind, source)])  # the failure is cached too
    assert engine.grammars.compiles == 1
    done = run(engine, [constrained("bad", [5, 6], 0, **{kind: source})])
    finish = done["bad"].finish
    assert finish is not None and finish.type == "abort" and finish.status == 400
    assert finish.message is not None and finish.message.startswith(reason), finish.message
    assert done["bad"].ids == [] and engine.grammars.compiles == 1


def test_the_tokenizer_refuses_two_constraints(tmp_path: Path) -> None:
    from tests.unit.test_tokenizer import write_model

    tok = TextTokenizer(str(write_model(tmp_path)))
    two = GenerateRequest(rid="y", gateway_id="g", text="hi", sampling=SamplingParams(regex="a", ebnf='root ::= "a"'))
    out = validate(two, tok)
    assert isinstance(out, RequestError) and "at most one of json_schema, regex and ebnf" in out.message
    good = GenerateRequest(rid="z", gateway_id="g", text="hi", sampling=SamplingParams(json_schema=json.dumps(PERSON)))
    assert isinstance(validate(good, tok), TokenizedRequest)


def test_retraction_and_chunked_prefill_keep_the_grammar(rig: Rig) -> None:
    """Long prompts fed in 16-token chunks into a pool too small for all of them: requests are
    retracted mid-output and resumed, and every output still validates."""
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 20, "maxItems": 20}
    ps = prompts(6, 3, 60, 90)
    reqs = [constrained(f"a{i}", p, i, json_schema=json.dumps(schema)) for i, p in enumerate(ps)]
    for r in reqs:
        r.sampling = msgspec.structs.replace(r.sampling, max_new_tokens=150)  # ample: ~60-80 tokens
    engine = rig.engine(pool=max(r.max_len for r in reqs) + 8, chunked_prefill_size=16)
    engine.decode.new_token_ratio = 0.1  # admission expects short outputs: the pool runs out mid-output
    done = run(engine, reqs)
    assert engine.decode.num_retracted > 0, "the pool was meant to be too small"
    for i in range(6):
        check_json(text_of(rig, done[f"a{i}"]), schema)


def test_a_migrated_request_replays_its_output_into_the_grammar(rig: Rig) -> None:
    first = run(rig.engine(), [constrained("m", [5, 6, 7], 1, json_schema=json.dumps(PERSON))])["m"]
    cut = len(first.all_ids) // 2
    resumed = constrained("m2", [5, 6, 7], 2, json_schema=json.dumps(PERSON))
    resumed.output_ids = list(first.all_ids[:cut])
    resumed.emitted = resumed.resumed = cut
    out = run(rig.engine(), [resumed])["m2"]
    assert out.all_ids[:cut] == first.all_ids[:cut]
    check_json(text_of(rig, out), PERSON)

    broken = constrained("m3", [5, 6, 7], 3, json_schema=json.dumps(PERSON))
    broken.output_ids = rig.tokenizer.encode("hello", add_special_tokens=False).ids  # not JSON
    out = run(rig.engine(), [broken])["m3"]
    assert out.finish is not None and out.finish.type == "abort"
    assert out.finish.message == "resume_output_ids do not match the request's json_schema"


@pytest.mark.parametrize("sampling", [{"min_new_tokens": 300}, {"ignore_eos": True}])
def test_the_grammar_end_ends_the_request(rig: Rig, sampling: dict[str, Any]) -> None:
    """min_new_tokens beyond the grammar's end, or ignore_eos: the request still stops there."""
    req = make_req("g", [5, 6], temperature=1.0, seed=0, max_new_tokens=MAX_NEW_TOKENS, regex="(cat|dog)!", **sampling)
    out = run(rig.engine(), [req])["g"]
    assert out.finish is not None and out.finish.type == "stop"
    assert text_of(rig, out) in ("cat!", "dog!")


def test_the_c_mask_matches_xgrammar() -> None:
    apply = load_apply_token_bitmask()
    assert apply is not None, "the CPU kernels build on this machine"
    gen = torch.Generator().manual_seed(0)
    for vocab in (49152, 1000, 37):
        mask = xgr.allocate_token_bitmask(5, vocab)
        mask.random_(-(2**31), 2**31 - 1, generator=gen)
        mask[1] = -1  # all allowed
        mask[2] = 0  # none
        logits = torch.randn(5, vocab, generator=gen)
        expected = logits.clone()
        xgr.apply_token_bitmask_inplace(expected, mask, backend="cpu")
        apply(logits, mask)
        assert torch.equal(logits, expected)


def test_masks_touch_only_constrained_rows() -> None:
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a", "b", "c", "</s>"], stop_token_ids=[3]))
    matcher = xgr.GrammarMatcher(compiler.compile_regex("b+"))
    logits = torch.zeros(3, 4)
    TokenMasks().apply(logits, [None, matcher, None])
    assert torch.equal(logits[0], torch.zeros(4)) and torch.equal(logits[2], torch.zeros(4))
    assert logits[1].tolist() == [float("-inf"), 0.0, float("-inf"), float("-inf")]


def test_only_length_bounded_plain_strings_are_rewritten() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "minLength": 1, "maxLength": 4},
            "b": {"type": "array", "items": {"type": "string", "maxLength": 2}},
            "c": {"type": "string", "format": "date", "maxLength": 10},
            "d": {"type": "string"},
        },
    }
    out = json.loads(json_schema_for_xgrammar(json.dumps(schema)))
    assert out["properties"]["a"] == {"type": "string", "pattern": "^[ !#-\\[\\]-~]{1,4}$"}
    assert out["properties"]["b"]["items"] == {"type": "string", "pattern": "^[ !#-\\[\\]-~]{0,2}$"}
    assert out["properties"]["c"] == schema["properties"]["c"] and out["properties"]["d"] == {"type": "string"}
    assert json_schema_for_xgrammar('{"type": "integer"}') == '{"type": "integer"}'
    assert json_schema_for_xgrammar("{not json") == "{not json"
