"""Sampling, per request in one batch: greedy rows by argmax, the others by their own parameters."""

from __future__ import annotations

import torch

from services.scheduler.request import Req


def sample(logits: torch.Tensor, reqs: list[Req], banned: list[list[int]]) -> list[int]:
    """logits: [B, vocab] float32 for the last position of each request; banned[i]: ids row i may
    not produce yet (stop and EOS ids before min_new_tokens)."""
    logits = logits.float()
    for i, ids in enumerate(banned):
        if ids:
            logits[i, ids] = float("-inf")
    out = logits.argmax(dim=-1).tolist()
    for i, req in enumerate(reqs):
        if not req.sampling.greedy:
            out[i] = _sample_row(logits[i], req)
    return out


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
