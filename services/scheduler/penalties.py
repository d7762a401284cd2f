"""Frequency, presence and repetition penalties on one request's next-token logits.

    frequency:  logit[t] -= frequency_penalty * count of t in the output so far
    presence:   logit[t] -= presence_penalty  * (t occurs in the output so far)
    repetition: for t in prompt or output: logit[t] /= p if logit[t] > 0 else logit[t] *= p
(OpenAI's definitions for the first two, the CTRL / Hugging Face one for the third.)
"""

from __future__ import annotations

import torch

from services.scheduler.request import Req


def needs_penalties(req: Req) -> bool:
    p = req.sampling
    return p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or p.repetition_penalty != 1.0


def apply_penalties(logits: torch.Tensor, req: Req) -> torch.Tensor:
    """A penalized copy of `logits` ([vocab] float32)."""
    p = req.sampling
    vocab = logits.numel()
    logits = logits.clone()
    if req.output_ids and (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0):
        out = torch.tensor(req.output_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(req.all_ids, dtype=torch.long, device=logits.device).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    return logits
