"""A request inside the scheduler: counters, not phases.

    all_ids = input_ids + output_ids
    [0, cached_len)            tokens whose KV is in the pool
    [cached_len, len(all_ids)) tokens the next forward feeds (the whole prompt, or the last sample)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from shared.messages import FinishReason, SamplingParams, TokenizedRequest


@dataclass(eq=False)
class Req:
    rid: str
    gateway_id: str
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    dispatch_id: int = 0
    created: float = 0.0
    arrived: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    cached_len: int = 0
    row: int = -1  # row in the req-to-token table while it holds KV
    seq: int = 0  # next TokenOutput sequence number
    emitted: int = 0  # output ids already sent to the detokenizer
    finish: FinishReason | None = None
    generator: torch.Generator | None = None

    @classmethod
    def from_msg(cls, msg: TokenizedRequest) -> Req:
        req = cls(
            rid=msg.rid,
            gateway_id=msg.gateway_id,
            input_ids=list(msg.input_ids),
            sampling=msg.sampling,
            stream=msg.stream,
            dispatch_id=msg.dispatch_id,
            created=msg.created,
        )
        if msg.sampling.seed is not None:
            req.generator = torch.Generator().manual_seed(msg.sampling.seed)
        return req

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def extend_len(self) -> int:
        return self.seq_len - self.cached_len

    @property
    def max_len(self) -> int:
        """Tokens of KV this request may hold at most: its reservation in the pool."""
        return len(self.input_ids) + self.sampling.max_new_tokens

    @property
    def finished(self) -> bool:
        return self.finish is not None
