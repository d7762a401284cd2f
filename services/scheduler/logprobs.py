"""Logprobs as SGLang's /generate returns them: (logprob, token_id) pairs, plus the top-k ones.

Output logprobs come from the distribution the token was sampled from before truncation: the
logits after penalties and min_new_tokens bans, divided by the temperature (1 for greedy), and
before top_k / top_p / min_p. Input logprobs come from the raw logits: the logprob of prompt token
i is read at position i - 1 (token 0 has none: None).
"""

from __future__ import annotations

import torch

Pair = tuple[float, int]


def token_logprob(logprobs: torch.Tensor, token: int) -> Pair:
    return (float(logprobs[token]), token)


def top_logprobs(logprobs: torch.Tensor, k: int) -> list[Pair]:
    """The k most likely tokens of one row, most likely first."""
    if k <= 0:
        return []
    vals, ids = logprobs.topk(min(k, logprobs.numel()))
    return [(float(v), int(i)) for v, i in zip(vals.tolist(), ids.tolist(), strict=True)]


def input_positions(start: int, fed_from: int, fed_to: int, num_input: int, have: int) -> range:
    """Prompt tokens i whose logprob this step yields: positions i-1 in [fed_from, fed_to),
    i in [start, num_input), not yet collected (`have` of them already are, from `start` on)."""
    lo = max(fed_from + 1, start + have, 1)
    hi = min(fed_to + 1, num_input)
    return range(lo, max(lo, hi))
