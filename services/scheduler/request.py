"""A request inside the scheduler: counters, not phases.

    all_ids = input_ids + output_ids
    [0, tree_len)              KV owned by the radix tree (matched prefix; locked at `node`)
    [tree_len, cached_len)     KV owned by this request (its table row holds the slots)
    [cached_len, seq_len)      tokens still to feed: the prompt (maybe over several chunked
                               steps), or the last sampled token when decoding
A step feeds `extend_now` of those; the request emits a token only when that reaches seq_len.
Retraction resets cached_len to 0: the request resumes as a prompt of all_ids.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from services.scheduler.radix import Node
from shared.messages import DETOK_CONTEXT, FinishReason, SamplingParams, TokenizedRequest, TokenOutput


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
    tree_len: int = 0
    node: Node | None = None  # radix node locked for [0, tree_len), or None
    extend_now: int = 0  # tokens this step feeds
    row: int = -1  # row in the req-to-token table while it holds KV
    seq: int = 0  # next TokenOutput sequence number
    first_seq: int = 0  # seq of this request's first TokenOutput here (> 0 after a migration)
    resumed: int = 0  # output ids it brought from an earlier rank (migration)
    emitted: int = 0  # output ids already sent to the detokenizer
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    admitted: bool = False
    finish: FinishReason | None = None
    generator: torch.Generator | None = None
    grammar: Any = None  # xgrammar.GrammarMatcher of a constrained request (services/scheduler/grammar.py)
    # logprobs (SGLang's /generate): start < 0 means no input logprobs
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    input_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    input_top: list[list[tuple[float, int]]] = field(default_factory=list)
    output_logprobs: list[tuple[float, int]] = field(default_factory=list)
    output_top: list[list[tuple[float, int]]] = field(default_factory=list)
    # prefill/decode disaggregation
    ships_kv_from: int = -1  # prefill rank: >= 0 ships the prompt's rows from here on, then ends
    kv_rows: torch.Tensor | None = None  # prefill rank: those rows, exported once prefilled
    prefill_where: str = ""  # decode rank: "remote" (a prefill rank's KV installed) or "local"

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
            return_logprob=msg.return_logprob,
            top_logprobs_num=msg.top_logprobs_num,
            logprob_start_len=msg.logprob_start_len,
        )
        if msg.resume_output_ids:
            # A migrated request: what it generated elsewhere is output already (max_new_tokens,
            # penalties, stop checks count it); it is fed as part of the first prefill and never
            # sent again, and its outputs continue at the epoch the gateway expects.
            req.output_ids = list(msg.resume_output_ids)
            req.emitted = len(req.output_ids)
            req.resumed = len(req.output_ids)
        req.seq = req.first_seq = msg.first_seq
        return req

    def __post_init__(self) -> None:
        if self.sampling.seed is not None and self.generator is None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def extend_len(self) -> int:
        """Tokens not yet fed (the whole remaining prompt, or 1 when decoding)."""
        return self.seq_len - self.cached_len

    @property
    def max_len(self) -> int:
        """Tokens of KV this request may hold at most."""
        return len(self.input_ids) + self.sampling.max_new_tokens

    @property
    def scores_prompt(self) -> bool:
        """max_new_tokens 0 with input logprobs (prompt scoring, e.g. an eval harness's
        loglikelihood): the prompt is prefilled for its logprobs and nothing is sampled."""
        return self.sampling.max_new_tokens == 0 and self.input_logprob_start < len(self.input_ids)

    @property
    def emits_now(self) -> bool:
        """Whether this step's forward reaches the end of the sequence (and so samples)."""
        return self.cached_len + self.extend_now == self.seq_len

    @property
    def input_logprob_start(self) -> int:
        """First prompt position whose logprob is returned, or len(input_ids) for none."""
        if not self.return_logprob or self.logprob_start_len < 0:
            return len(self.input_ids)
        return min(self.logprob_start_len, len(self.input_ids))

    @property
    def finished(self) -> bool:
        return self.finish is not None

    def take_output(self) -> TokenOutput:
        """The TokenOutput for what this request generated since the last one (streamed or final);
        the next one continues after it."""
        start = self.emitted if self.stream else 0
        context = self.output_ids[max(0, start - DETOK_CONTEXT) : start]
        new = self.output_ids[start:]
        self.emitted = len(self.output_ids)
        out = TokenOutput(
            rid=self.rid,
            gateway_id=self.gateway_id,
            seq=self.seq,
            ids=context + new,
            num_new=len(new),
            prompt_tokens=len(self.input_ids),
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
            skip_special_tokens=self.sampling.skip_special_tokens,
            stop=self.sampling.stop,
            no_stop_trim=self.sampling.no_stop_trim,
            finish=self.finish,
            all_ids=self.output_ids if self.finished else None,
            prefill=self.prefill_where,
        )
        if self.return_logprob:
            first = self.seq == self.first_seq and not self.resumed
            out.input_token_logprobs = list(self.input_logprobs) if first else None
            out.input_top_logprobs = list(self.input_top) if first and self.top_logprobs_num else None
            out.output_token_logprobs = self.output_logprobs[start:]
            out.output_top_logprobs = self.output_top[start:] if self.top_logprobs_num else None
        self.seq += 1
        return out
