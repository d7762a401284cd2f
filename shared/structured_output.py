"""Structured outputs, the parts more than one service needs: the syntax check of a constraint
(the tokenizer service: a bad json_schema / regex / ebnf is a 400 before the request runs) and the
JSON Schema rewrite the scheduler's grammar compiler needs (services/scheduler/grammar.py).

xgrammar 0.2.9 compiles a string with minLength / maxLength to a rule that admits raw control
characters (invalid JSON) and no escapes, and its `pattern` rules admit overlong UTF-8 (bytes that
decode to U+FFFD, so a string's decoded length exceeds its maxLength). `json_schema_for_xgrammar`
rewrites a length-bounded string to a pattern of printable ASCII other than `"` and `\\`, which
needs no escape and which xgrammar compiles correctly: such strings come out ASCII-only. Found by
the random-schema tests (tests/structured.py).

xgrammar is imported at first use (it costs about 1.5 s, with transformers).
"""

from __future__ import annotations

import json
import re
from typing import Any


def check_syntax(kind: str, source: str) -> str | None:
    """What is wrong with a constraint, or None: the grammar alone, without a vocabulary."""
    import xgrammar as xgr

    try:
        if kind == "json_schema":
            xgr.Grammar.from_json_schema(json_schema_for_xgrammar(source), any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(source)
        elif kind == "ebnf":
            xgr.Grammar.from_ebnf(source)
        else:
            return f"unknown constraint kind {kind!r}"
    except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors, by input
        return error_message(kind, e)
    return None


def error_message(kind: str, e: Exception) -> str:
    """xgrammar's message without its C++ prefix ("[hh:mm:ss] /path/file.cc:94: Check failed: ...: ")."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false: ", "", text)
    return f"invalid {kind}: {text[:300]}"


def json_schema_for_xgrammar(source: str) -> str:
    """The schema with every length-bounded plain string (no pattern, format, enum or const) given
    as a pattern of printable ASCII (see the module docstring); other text unchanged."""
    try:
        schema = json.loads(source)
    except ValueError:
        return source  # xgrammar reports the syntax error
    return json.dumps(_bound_strings(schema)) if _has_bounded_string(schema) else source


def _has_bounded_string(node: Any) -> bool:
    if isinstance(node, dict):
        return _is_bounded_string(node) or any(_has_bounded_string(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_bounded_string(v) for v in node)
    return False


def _is_bounded_string(node: dict[str, Any]) -> bool:
    return (
        node.get("type") == "string"
        and ("minLength" in node or "maxLength" in node)
        and not any(k in node for k in ("pattern", "format", "enum", "const"))
    )


def _bound_strings(node: Any) -> Any:
    if isinstance(node, list):
        return [_bound_strings(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bound_strings(v) for k, v in node.items()}
    if _is_bounded_string(node):
        lo, hi = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        upper = "" if hi is None else str(int(hi))
        out["pattern"] = f"^[ !#-\\[\\]-~]{{{lo},{upper}}}$"
    return out
