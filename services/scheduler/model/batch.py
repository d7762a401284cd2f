"""ForwardBatch: the one record the model reads for a step that mixes prefill (extend) and decode.

Request i contributes extend_lens[i] >= 1 new tokens (a decode request has exactly 1). Invariants:
  len(input_ids) == len(positions) == len(out_cache_loc) == sum(extend_lens) == T
  len(kv_indices[i]) == seq_lens[i] >= extend_lens[i]
  kv_indices[i][-extend_lens[i]:] == request i's slice of out_cache_loc
  positions of request i are prefix_len_i .. seq_lens[i]-1, prefix_len_i = seq_lens[i] - extend_lens[i]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from services.scheduler.model.kv_pool import KVPool


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # LongTensor[T]
    positions: torch.Tensor  # LongTensor[T]
    out_cache_loc: torch.Tensor  # LongTensor[T]
    extend_lens: list[int]
    seq_lens: list[int]
    kv_indices: list[torch.Tensor]  # per request: LongTensor[seq_lens[i]]
    kv_pool: KVPool

    @property
    def batch_size(self) -> int:
        return len(self.extend_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def prefix_lens(self) -> list[int]:
        return [s - e for s, e in zip(self.seq_lens, self.extend_lens, strict=True)]

    def to(self, device: torch.device | str) -> ForwardBatch:
        """This batch with its index tensors on `device` (batches are built on the CPU; the copies
        are tiny next to the forward). The pool stays where it is."""
        if self.input_ids.device == torch.device(device):
            return self
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            out_cache_loc=self.out_cache_loc.to(device),
            kv_indices=[i.to(device) for i in self.kv_indices],
        )

    def last_token_index(self) -> torch.Tensor:
        """Index into the T new tokens of each request's last new token: LongTensor[B]."""
        ends = torch.tensor(self.extend_lens, dtype=torch.long).cumsum(0) - 1
        return ends.to(self.input_ids.device)

    def validate(self) -> None:
        n = len(self.extend_lens)
        if len(self.seq_lens) != n or len(self.kv_indices) != n:
            raise ValueError("extend_lens, seq_lens and kv_indices must have one entry per request")
        t = sum(self.extend_lens)
        for name in ("input_ids", "positions", "out_cache_loc"):
            if getattr(self, name).numel() != t:
                raise ValueError(f"{name} has {getattr(self, name).numel()} tokens, extend_lens sum to {t}")
        off = 0
        for i, (e, s, idx) in enumerate(zip(self.extend_lens, self.seq_lens, self.kv_indices, strict=True)):
            if e < 1 or s < e:
                raise ValueError(f"request {i}: need 1 <= extend_len ({e}) <= seq_len ({s})")
            if idx.numel() != s:
                raise ValueError(f"request {i}: kv_indices has {idx.numel()} slots, seq_len is {s}")
            if not torch.equal(idx[s - e :].cpu(), self.out_cache_loc[off : off + e].cpu()):
                raise ValueError(f"request {i}: last extend_len kv_indices differ from out_cache_loc")
            expect = torch.arange(s - e, s)
            if not torch.equal(self.positions[off : off + e].cpu(), expect):
                raise ValueError(f"request {i}: positions must be {s - e}..{s - 1}")
            off += e


def build_forward_batch(
    new_tokens: Sequence[Sequence[int]],
    prefix_slots: Sequence[torch.Tensor],
    new_slots: Sequence[torch.Tensor],
    kv_pool: KVPool,
    device: torch.device | str | None = None,
) -> ForwardBatch:
    """Build the batch for requests whose cached prefix lives at prefix_slots[i] (possibly empty)
    and whose new tokens new_tokens[i] will be written at new_slots[i] (e.g. from kv_pool.alloc)."""
    device = torch.device(device) if device is not None else kv_pool.device
    input_ids: list[int] = []
    positions: list[int] = []
    out_locs: list[torch.Tensor] = []
    extend_lens: list[int] = []
    seq_lens: list[int] = []
    kv_indices: list[torch.Tensor] = []
    for toks, prefix, slots in zip(new_tokens, prefix_slots, new_slots, strict=True):
        prefix = prefix.to("cpu", torch.long)
        slots = slots.to("cpu", torch.long)
        e, p = len(toks), prefix.numel()
        if e < 1 or slots.numel() != e:
            raise ValueError(
                f"a request needs >= 1 new token and one slot per token (got {e}, {slots.numel()})"
            )
        input_ids.extend(int(t) for t in toks)
        positions.extend(range(p, p + e))
        out_locs.append(slots)
        extend_lens.append(e)
        seq_lens.append(p + e)
        kv_indices.append(torch.cat([prefix, slots]).to(device))
    return ForwardBatch(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        out_cache_loc=torch.cat(out_locs).to(device)
        if out_locs
        else torch.empty(0, dtype=torch.long, device=device),
        extend_lens=extend_lens,
        seq_lens=seq_lens,
        kv_indices=kv_indices,
        kv_pool=kv_pool,
    )
