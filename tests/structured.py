"""Random output constraints for the structured-output tests: JSON schemas (nested objects,
arrays, enums, numbers with bounds, required fields) and regexes, each bounded so that any model
(the tiny random one included) ends within a few hundred tokens; and the check that an output
satisfies its constraint."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema_rs

MAX_NEW_TOKENS = 400  # ample for every constraint below


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object schema with 1-4 properties of mixed kinds; objects nest up to depth 2."""
    props = {f"{rng.choice(['id', 'name', 'tag', 'n', 'x', 'item', 'kind'])}_{i}": _value(rng, depth) for i in range(rng.randint(1, 4))}
    required = [k for k in props if rng.random() < 0.6]
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def _value(rng: random.Random, depth: int) -> dict[str, Any]:
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "null"] + (["object"] * 2 if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        lo = rng.randint(0, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 10)}
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 5000)}
    if kind == "number":
        lo = rng.uniform(-100, 100)
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0, 100), 2)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        pool = ["red", "green", "blue", "a b", "x\"y", 1, 2.5, None, True]
        return {"enum": rng.sample(pool, rng.randint(1, 4))}
    if kind == "array":
        lo = rng.randint(0, 2)
        return {"type": "array", "items": _value(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(0, 2)}
    return random_schema(rng, depth + 1)


def random_regex(rng: random.Random) -> str:
    """A regex of 1-4 bounded parts: classes, literals, alternations, optional groups."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["class", "literal", "alt", "opt"])
        if kind == "class":
            cls = rng.choice(["[a-z]", "[A-Z0-9]", "[0-9]", "\\d", "[a-f0-9_-]", "\\w"])
            lo = rng.randint(0, 3)
            parts.append(f"{cls}{{{lo},{lo + rng.randint(0, 5)}}}")
        elif kind == "literal":
            parts.append(re.escape(rng.choice(["-", "@", "id:", " ", ".", "(x)", "+1"])))
        elif kind == "alt":
            parts.append("(" + "|".join(rng.sample(["cat", "dog", "yes", "no", "maybe", "42"], rng.randint(2, 4))) + ")")
        else:
            parts.append(f"(\\.[0-9]{{1,{rng.randint(1, 3)}}})?")
    return "".join(parts)


def check_json(text: str, schema: dict[str, Any]) -> None:
    """Raises unless `text` is strict JSON (no control characters in strings) valid for `schema`."""
    value = json.loads(text)
    jsonschema_rs.validate(schema, value)


def check_regex(text: str, pattern: str) -> None:
    assert re.fullmatch(pattern, text), f"{text!r} does not match {pattern!r}"
