"""Sampling, per request in one batch.

Row i: penalties (penalties.py) -> logit_bias -> its structured output's token mask (grammar.py)
-> ban stop/EOS ids before min_new_tokens (unless the grammar allows nothing else) -> greedy
argmax, or temperature -> top_k -> softmax -> top_p -> min_p -> a draw from the request's own
generator (a seeded request draws the same numbers whatever else is in the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.scheduler.grammar import TokenMasks
from services.scheduler.logprobs import Pair, token_logprob, top_logprobs
from services.scheduler.penalties import apply_penalties, needs_penalties
from services.scheduler.request import Req


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[Pair | None] = field(default_factory=list)  # per row; None if not asked
    top: list[list[Pair]] = field(default_factory=list)


def sample(logits: torch.Tensor, reqs: list[Req], banned: list[list[int]], masks: TokenMasks | None = None) -> Sampled:
    """logits: [B, vocab] float32 for the last position of each request; banned[i]: ids row i may
    not produce yet (stop and EOS ids before min_new_tokens); masks: applies constrained rows'
    grammars (required when a request has one)."""
    logits = logits.float().clone()
    for i, req in enumerate(reqs):
        if needs_penalties(req):
            logits[i] = apply_penalties(logits[i], req)
        if req.sampling.logit_bias:
            _add_bias(logits[i], req.sampling.logit_bias)
    if any(r.grammar is not None for r in reqs):
        assert masks is not None, "a constrained request needs the token masks"
        masks.apply(logits, [r.grammar for r in reqs])
    for i, req in enumerate(reqs):
        if banned[i]:
            kept = logits[i, banned[i]].clone()
            logits[i, banned[i]] = float("-inf")
            if req.grammar is not None and not torch.isfinite(logits[i]).any():
                logits[i, banned[i]] = kept  # the grammar is complete: its end beats min_new_tokens
    tokens = logits.argmax(dim=-1).tolist() if len(reqs) else []
    out = Sampled(tokens)
    for i, req in enumerate(reqs):
        if not req.sampling.greedy:
            tokens[i] = _sample_row(logits[i], req)
        if req.return_logprob:
            t = req.sampling.temperature
            lp = torch.log_softmax(logits[i] / (t if t > 0 else 1.0), dim=-1)
            out.logprobs.append(token_logprob(lp, tokens[i]))
            out.top.append(top_logprobs(lp, req.top_logprobs_num))
        else:
            out.logprobs.append(None)
            out.top.append([])
    return out


def _add_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    """OpenAI's logit_bias, in place; ids were checked against the tokenizer's vocabulary, and one
    beyond the model's (a tokenizer with more added tokens than the model has rows) is skipped."""
    ids = [t for t in bias if t < row.numel()]
    row[ids] += torch.tensor([bias[t] for t in ids], dtype=row.dtype, device=row.device)


def _sample_row(logits: torch.Tensor, req: Req) -> int:
    p = req.sampling
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        sorted_probs[before >= p.top_p] = 0.0  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return int(torch.multinomial(probs, 1, generator=req.generator).item())
