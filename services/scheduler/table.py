"""The req-to-token table: row r, column i = pool slot of token i of the request in row r."""

from __future__ import annotations

import torch


class ReqToTokenTable:
    def __init__(self, max_requests: int, max_len: int, device: str = "cpu") -> None:
        self.slots = torch.zeros((max_requests, max_len), dtype=torch.int64, device=device)
        self.free_rows = list(range(max_requests - 1, -1, -1))

    @property
    def max_len(self) -> int:
        return self.slots.shape[1]

    def alloc(self) -> int:
        return self.free_rows.pop()

    def free(self, row: int) -> None:
        self.free_rows.append(row)

    @property
    def num_free(self) -> int:
        return len(self.free_rows)
