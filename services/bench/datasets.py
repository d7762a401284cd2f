"""Benchmark prompts: `random`, `generated-shared-prefix`, and a ShareGPT-format JSON file.

Every dataset yields `BenchRequest`s with the prompt's exact token count and the number of tokens
to generate. Random prompts are token ids (exact lengths, no retokenization drift); ShareGPT
prompts are text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer


@dataclass(frozen=True)
class BenchRequest:
    prompt_len: int
    output_len: int
    text: str | None = None
    input_ids: list[int] | None = None


def _lengths(rng: random.Random, mean: int, ratio: float, n: int) -> list[int]:
    """SGLang's `random_range_ratio`: lengths uniform in [mean * ratio, mean]."""
    low = max(1, int(mean * ratio))
    return [rng.randint(low, max(low, mean)) for _ in range(n)]


def _ids(rng: random.Random, vocab_size: int, n: int) -> list[int]:
    return [rng.randrange(1, vocab_size) for _ in range(n)]  # 1..: skip id 0 (often a pad / unk)


def random_dataset(
    num_prompts: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, seed: int
) -> list[BenchRequest]:
    rng = random.Random(seed)
    ins = _lengths(rng, input_len, range_ratio, num_prompts)
    outs = _lengths(rng, output_len, range_ratio, num_prompts)
    return [BenchRequest(i, o, input_ids=_ids(rng, vocab_size, i)) for i, o in zip(ins, outs, strict=True)]


def shared_prefix_dataset(
    num_groups: int,
    prompts_per_group: int,
    system_prompt_len: int,
    question_len: int,
    output_len: int,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """`num_groups` system prompts, each shared by `prompts_per_group` questions; shuffled."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_groups):
        system = _ids(rng, vocab_size, system_prompt_len)
        for _ in range(prompts_per_group):
            ids = system + _ids(rng, vocab_size, question_len)
            out.append(BenchRequest(len(ids), output_len, input_ids=ids))
    rng.shuffle(out)
    return out


def sharegpt_dataset(
    path: str | Path, num_prompts: int, tokenizer: Tokenizer, seed: int, fixed_output_len: int | None = None
) -> list[BenchRequest]:
    """The first human turn of each conversation; the reply's length is the output length.

    Like SGLang: pairs with a prompt or reply under 4 tokens, a prompt over 1024 tokens or a total
    over 2048 are skipped.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations")
    pairs = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") if isinstance(item, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first, second = turns[0], turns[1]
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (first, second)):
            continue
        pairs.append((first["value"], second["value"]))
    random.Random(seed).shuffle(pairs)
    out: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(out) == num_prompts:
            break
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
        output_len = fixed_output_len or len(tokenizer.encode(reply, add_special_tokens=False).ids)
        if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        out.append(BenchRequest(prompt_len, output_len, text=prompt))
    if not out:
        raise ValueError(f"{path}: no usable conversations")
    return out
