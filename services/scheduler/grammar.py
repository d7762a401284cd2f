"""Structured outputs: a request's json_schema / regex / ebnf, enforced as a token mask every step.

    Grammars.prepare(constraints)    compiled against this rank's vocabulary once per (kind, source)
                                     (a bounded cache), on the forward thread
    Grammars.matcher(kind, source)   a fresh matcher per request (Engine.add)
    TokenMasks.apply(logits, rows)   the sampler: each constrained row's allowed next tokens, as
                                     xgrammar's bitmask, applied to its logits (other ids -> -inf)
    matcher.accept_token(t)          the engine, for every token a constrained request emits; a
                                     matcher that reached the end of its grammar (and accepted EOS)
                                     is terminated, and the request stops

The library is xgrammar (the one SGLang and vLLM default to), picked by measurement:
benchmarks/grammar_mask.py. It is imported at first use: importing it costs about 1.5 s, which a
deployment without constrained requests never pays. JSON is constrained without free whitespace
(`any_whitespace=False`: xgrammar's ", " and ": " separators), so even a model that favours
whitespace cannot loop on it; a bounded schema (maxLength, maxItems, enum) always ends.

A constraint that does not compile is refused before the request runs: its request ends with an
abort of HTTP status 400 (FinishReason.status), which the gateway answers as a 400 error.

xgrammar 0.2.9 compiles a string with minLength / maxLength to a rule that admits raw control
characters (invalid JSON) and no escapes, and its `pattern` rules admit overlong UTF-8 (bytes that
decode to U+FFFD, so a string's decoded length exceeds its maxLength). `json_schema_for_xgrammar`
rewrites a length-bounded string to a pattern of printable ASCII other than `"` and `\\`, which
needs no escape and which xgrammar compiles correctly: such strings come out ASCII-only. Found by
the random-schema tests (tests/structured.py).

A migrated or resumed request replays its earlier output ids into a fresh matcher (`replay`).
Retraction keeps a request's output ids, hence its matcher as it is.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from services.scheduler.cpu import load_apply_token_bitmask
from shared.bounded import BoundedDict

if TYPE_CHECKING:
    import xgrammar

log = logging.getLogger("scheduler.grammar")


class GrammarError(ValueError):
    """A constraint that does not compile (bad JSON Schema, regex or EBNF); its message says why."""


class Grammars:
    """This rank's grammar compiler and its cache of compiled constraints."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...], cache_size: int = 256):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = list(stop_token_ids)
        self._compiler: xgrammar.GrammarCompiler | None = None
        # (kind, source) -> compiled grammar, or the error it failed with
        self._compiled: BoundedDict[tuple[str, str], xgrammar.CompiledGrammar | GrammarError] = BoundedDict(cache_size)
        self.compiles = 0  # compilations (cache misses), failed ones included

    def matcher(self, kind: str, source: str) -> xgrammar.GrammarMatcher:
        """A new matcher at the start of the constraint (compiled here if `prepare` did not);
        GrammarError if it does not compile."""
        import xgrammar as xgr

        compiled = self._compiled.get((kind, source))
        if compiled is None:
            compiled = self._compile(kind, source)
        if isinstance(compiled, GrammarError):
            raise compiled
        return xgr.GrammarMatcher(compiled)

    def prepare(self, constraints: list[tuple[str, str]]) -> None:
        """Compiles the constraints not cached yet, failures included (the service calls this on its
        forward thread: xgrammar releases the GIL while it compiles, and the first call imports it,
        so the event loop keeps serving heartbeats)."""
        for kind, source in constraints:
            if (kind, source) not in self._compiled:
                self._compile(kind, source)

    def _compile(self, kind: str, source: str) -> xgrammar.CompiledGrammar | GrammarError:
        compiler = self._compiler or self._make_compiler()
        compiled: xgrammar.CompiledGrammar | GrammarError
        try:
            if kind == "json_schema":
                compiled = compiler.compile_json_schema(json_schema_for_xgrammar(source), any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(source)
            elif kind == "ebnf":
                compiled = compiler.compile_grammar(source)
            else:
                compiled = GrammarError(f"unknown constraint kind {kind!r}")
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors, by input
            compiled = GrammarError(error_message(kind, e))
        self.compiles += 1
        self._compiled[(kind, source)] = compiled
        return compiled

    def _make_compiler(self) -> xgrammar.GrammarCompiler:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids)
        # xgrammar's own cache is unbounded by default: `_compiled` is the one cache, bounded
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        log.info("grammar compiler ready vocab=%d stop_token_ids=%s", self._vocab_size, self._stop_token_ids)
        return self._compiler


def replay(matcher: xgrammar.GrammarMatcher, token_ids: list[int]) -> bool:
    """Feeds output ids generated before (a migrated request's); False if they break the grammar."""
    return all(matcher.accept_token(t) for t in token_ids)


class TokenMasks:
    """Applies the constrained rows' masks to a step's logits (the sampler, on the forward thread)."""

    def __init__(self) -> None:
        self._apply = load_apply_token_bitmask()
        self._mask = torch.empty(0, 0, dtype=torch.int32)  # reused step to step: [rows, words]

    def apply(self, logits: torch.Tensor, matchers: list[Any]) -> None:
        """In place on logits [B, vocab]. matchers[i]: row i's matcher, or None for an unconstrained
        row, whose mask stays all ones (the C kernel skips such words at a load each)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        import xgrammar as xgr

        words = (logits.shape[1] + 31) // 32
        if self._mask.shape[0] < len(matchers) or self._mask.shape[1] != words:
            self._mask = torch.empty(max(len(matchers), 2 * self._mask.shape[0]), words, dtype=torch.int32)
        mask = self._mask[: len(matchers)]
        mask.fill_(-1)  # all allowed (xgrammar's allocate_token_bitmask costs ~4 ms at batch 32)
        for i in rows:
            matchers[i].fill_next_token_bitmask(mask, i)
        if self._apply is not None and logits.dtype == torch.float32 and logits.is_contiguous() and logits.device.type == "cpu":
            self._apply(logits, mask)
        else:
            xgr.apply_token_bitmask_inplace(logits, mask.to(logits.device), indices=rows)


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
