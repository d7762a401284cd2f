"""The paged-KV layout the attention kernels read: a CSR over the KV pool's slots.

Request i's keys live at pool slots kv_indices[kv_indptr[i] : kv_indptr[i + 1]], in sequence order
(page size 1, so a "page boundary" is any slot boundary and slots need not be contiguous). Its new
query tokens are rows qo_indptr[i] : qo_indptr[i + 1] of q. Invariants: both indptrs start at 0,
are non-decreasing, and for attention over a cached prefix the query rows of request i are the
last (qo_indptr[i+1] - qo_indptr[i]) positions of its kv_indptr range.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def indptr_from_lens(lens: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """int32 [len(lens) + 1]: 0, then the running sum of lens."""
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    if lens:
        out[1:] = torch.tensor(list(lens), dtype=torch.int64).cumsum(0)
    return out.to(device)


def flatten_kv_indices(kv_indices: Sequence[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """One int64 tensor of all requests' slot indices, concatenated in request order."""
    if not kv_indices:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat([idx.to(device, torch.int64) for idx in kv_indices])


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
