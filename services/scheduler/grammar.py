"""Structured outputs: a request's json_schema / regex / ebnf, enforced as a token mask every step.

    Grammars.matcher(kind, source)   compiled against this rank's vocabulary once per (kind, source)
                                     (a bounded cache), then a fresh matcher per request
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

The constraint's syntax is checked before the request runs (shared/structured_output.py, the
tokenizer service); a bad one is a 400.

A migrated or resumed request replays its earlier output ids into a fresh matcher (`replay`).
Retraction keeps a request's output ids, hence its matcher as it is.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from services.scheduler.cpu import load_apply_token_bitmask
from shared.bounded import BoundedDict
from shared.structured_output import error_message, json_schema_for_xgrammar

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
        self._compiled: BoundedDict[tuple[str, str], xgrammar.CompiledGrammar] = BoundedDict(cache_size)
        self.compiles = 0  # constraints compiled (cache misses)

    def matcher(self, kind: str, source: str) -> xgrammar.GrammarMatcher:
        """A new matcher at the start of the constraint; GrammarError if it does not compile."""
        import xgrammar as xgr

        key = (kind, source)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(kind, source)
            self._compiled[key] = compiled
        return xgr.GrammarMatcher(compiled)

    def _compile(self, kind: str, source: str) -> xgrammar.CompiledGrammar:
        compiler = self._compiler or self._make_compiler()
        try:
            if kind == "json_schema":
                compiled = compiler.compile_json_schema(json_schema_for_xgrammar(source), any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(source)
            elif kind == "ebnf":
                compiled = compiler.compile_grammar(source)
            else:
                raise GrammarError(f"unknown constraint kind {kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors, by input
            raise GrammarError(error_message(kind, e)) from None
        self.compiles += 1
        return compiled

    def _make_compiler(self) -> xgrammar.GrammarCompiler:
        import xgrammar as xgr
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size, stop_token_ids=self._stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        log.info("grammar compiler ready vocab=%d stop_token_ids=%s", self._vocab_size, self._stop_token_ids)
        return self._compiler


def replay(matcher: xgrammar.GrammarMatcher, token_ids: list[int]) -> bool:
    """Feeds output ids generated before (a migrated request's); False if they break the grammar."""
    return all(matcher.accept_token(t) for t in token_ids)


class TokenMasks:
    """Applies the constrained rows' masks to a step's logits (the sampler, on the forward thread)."""

    def __init__(self) -> None:
        self._apply = load_apply_token_bitmask()

    def apply(self, logits: torch.Tensor, matchers: list[Any]) -> None:
        """In place. matchers[i]: row i's matcher, or None for an unconstrained row."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        import xgrammar as xgr

        vocab = logits.shape[1]
        mask = xgr.allocate_token_bitmask(len(rows), vocab)
        for j, i in enumerate(rows):
            matchers[i].fill_next_token_bitmask(mask, j)
        sub = logits[rows].contiguous()
        if self._apply is not None and sub.dtype == torch.float32 and sub.device.type == "cpu":
            self._apply(sub, mask)
        else:
            xgr.apply_token_bitmask_inplace(sub, mask.to(sub.device))
        logits[rows] = sub
