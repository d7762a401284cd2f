"""Structured outputs through a real `dpserve serve --dp-size 2` on the tiny random model: 200
random JSON schemas and 50 random regexes sent as batch /generate requests at temperature 1; every
output parses and validates, on both ranks. A streamed constrained request ends valid too, and a bad
constraint is a 400 naming xgrammar's reason."""

from __future__ import annotations

import json
import random
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.client import post, stream
from tests.structured import MAX_NEW_TOKENS, check_json, check_regex, random_regex, random_schema


@pytest.fixture(scope="module")
def server(server_factory: Any) -> Any:
    return server_factory("--dp-size", "2", "--request-timeout", "120")


def test_random_schemas_and_regexes_validate_at_dp_2(server: Any) -> None:
    rng = random.Random(2026)
    cases: list[tuple[str, Any]] = [("json_schema", random_schema(rng)) for _ in range(200)]
    cases += [("regex", random_regex(rng)) for _ in range(50)]
    params = [
        {"temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS, "seed": i,
         kind: json.dumps(c) if kind == "json_schema" else c}
        for i, (kind, c) in enumerate(cases)
    ]
    batches = [range(i, min(i + 25, len(cases))) for i in range(0, len(cases), 25)]

    def send(idx: range) -> list[dict[str, Any]]:
        body = {"text": [f"Answer {i}:" for i in idx], "sampling_params": [params[i] for i in idx]}
        status, out = post(server.url + "/generate", body, timeout=300)
        assert status == 200, out
        return out

    with ThreadPoolExecutor(4) as pool:
        outs = [o for batch in pool.map(send, batches) for o in batch]
    assert len(outs) == len(cases)
    for (kind, c), out in zip(cases, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (c, out)
        (check_json if kind == "json_schema" else check_regex)(out["text"], c)
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
        metrics = resp.read().decode()
    decisions = dict(re.findall(r'^dpserve:dispatcher_decisions_total\{[^}]*dp_rank="(\d)"[^}]*\} (\S+)', metrics, re.M))
    assert all(float(decisions.get(r, 0)) >= 50 for r in ("0", "1")), decisions  # both ranks served constraints


def test_a_streamed_constrained_request_ends_valid(server: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}}, "required": ["ok", "n"]}
    events = stream(server.url, text="JSON:", sampling_params={"temperature": 1.0, "seed": 3, "json_schema": json.dumps(schema)})
    assert len(events) > 2 and events[-1]["meta_info"]["finish_reason"]["type"] == "stop"
    check_json(events[-1]["text"], schema)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"json_schema": '{"type": "objec'}, "invalid json_schema: "),
        ({"regex": "(a"}, "invalid regex: "),
        ({"ebnf": "root ::= nothing"}, "invalid ebnf: "),
        ({"regex": "a", "json_schema": "{}"}, "at most one of json_schema, regex and ebnf"),
    ],
)
def test_a_bad_constraint_is_a_400(server: Any, params: dict[str, Any], reason: str) -> None:
    status, out = post(server.url + "/generate", {"text": "hi", "sampling_params": params})
    assert status == 400 and reason in out["error"]["message"], out
