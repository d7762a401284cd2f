"""Sampler, penalties, min_p and logprobs against direct torch computations on the same logits."""

from __future__ import annotations

from typing import Any

import torch

from services.scheduler.request import Req
from services.scheduler.sampler import sample
from shared.messages import SamplingParams

V = 50


def make(prompt: list[int], out: list[int], **params: Any) -> Req:
    r = Req(rid="r", gateway_id="g", input_ids=prompt, sampling=SamplingParams(**params))
    r.output_ids = list(out)
    return r


def test_penalties_match_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, V, generator=g) * 3
    prompt, out = [1, 2, 3], [3, 4, 4, 4, 7]
    r = make(prompt, out, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.7, repetition_penalty=1.3)
    r.return_logprob, r.top_logprobs_num = True, 5
    expect = logits[0].clone()
    for t in set(out):
        expect[t] -= 0.5 * out.count(t) + 0.7
    for t in set(prompt + out):
        expect[t] = expect[t] / 1.3 if expect[t] > 0 else expect[t] * 1.3
    got = sample(logits, [r], [[]])
    assert got.tokens == [int(expect.argmax())]
    lp = torch.log_softmax(expect, -1)
    assert got.logprobs[0] is not None
    assert abs(got.logprobs[0][0] - float(lp[got.tokens[0]])) < 1e-5
    vals, ids = lp.topk(5)
    assert [i for _, i in got.top[0]] == ids.tolist()
    torch.testing.assert_close(torch.tensor([v for v, _ in got.top[0]]), vals)


def test_penalty_changes_the_greedy_choice() -> None:
    logits = torch.zeros(1, V)
    logits[0, 9], logits[0, 8] = 2.0, 1.5
    plain = make([1], [9], temperature=0.0)
    penal = make([1], [9], temperature=0.0, frequency_penalty=1.0)
    assert sample(logits.repeat(2, 1), [plain, penal], [[], []]).tokens == [9, 8]


def test_min_p_keeps_exactly_the_tokens_above_threshold() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, V, generator=g) * 2
    probs = torch.softmax(logits[0] / 0.7, -1)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    r = make([1], [], temperature=0.7, min_p=0.3, seed=5)
    seen = {sample(logits, [r], [[]]).tokens[0] for _ in range(300)}
    assert seen <= allowed and len(allowed) > 1 and len(seen) > 1


def test_top_k_and_banned_ids() -> None:
    logits = torch.arange(V, dtype=torch.float32).unsqueeze(0)
    r = make([1], [], temperature=1.0, top_k=2, seed=0)
    seen = {sample(logits, [r], [[]]).tokens[0] for _ in range(100)}
    assert seen == {V - 1, V - 2}
    g = make([1], [], temperature=0.0)
    assert sample(logits, [g], [[V - 1]]).tokens == [V - 2]


def test_seeded_rows_ignore_their_neighbours() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, V, generator=g)
    a = [make([1], [], temperature=1.0, seed=7) for _ in range(2)]
    other = make([1], [], temperature=1.0)
    first = [sample(logits[2:3], [a[0]], [[]]).tokens[0] for _ in range(10)]
    batched = [sample(logits, [other, other, a[1]], [[], [], []]).tokens[2] for _ in range(10)]
    assert first == batched
