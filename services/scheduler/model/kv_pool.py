"""KVPool: per-layer K/V tensors indexed by slot, and the allocator that hands slots out.

A slot holds one token's K and V for every layer (page size 1). Invariant: every slot index in
[0, size) is either free (in the free list, exactly once) or owned by exactly one request, so
`num_free + num_used == size` always holds and freeing a free slot is an error.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(
        self,
        num_layers: int,
        size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if size <= 0:
            raise ValueError(f"KVPool size must be positive, got {size}")
        self.num_layers = num_layers
        self.size = size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (size, num_kv_heads, head_dim)
        self.k: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.v: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        # Allocator state lives on the CPU: the stack of free slots and a used-flag per slot.
        self._free: torch.Tensor = torch.arange(size - 1, -1, -1, dtype=torch.long)
        self._num_free = size
        self._used = torch.zeros(size, dtype=torch.bool)

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.size - self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """n free slots (LongTensor on the CPU, lowest first), or None if fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > self._num_free:
            return None
        start = self._num_free - n
        slots = self._free[start : self._num_free].flip(0).clone()
        self._num_free = start
        self._used[slots] = True
        return slots

    def free(self, slots: torch.Tensor) -> None:
        """Return slots to the pool. Raises ValueError (changing nothing) on a slot that is not in use."""
        slots = slots.detach().to("cpu", torch.long).flatten()
        if slots.numel() == 0:
            return
        if int(slots.min()) < 0 or int(slots.max()) >= self.size:
            raise ValueError(f"slot out of range [0, {self.size})")
        if slots.unique().numel() != slots.numel() or not bool(self._used[slots].all()):
            raise ValueError("double free: some slots are not in use")
        self._used[slots] = False
        n = slots.numel()
        self._free[self._num_free : self._num_free + n] = slots.flip(0)
        self._num_free += n

    # --- a request's rows, for prefill/decode disaggregation -----------------------------------

    def buffers(self) -> list[torch.Tensor]:
        """Every per-slot cache tensor of the model, [size, ...] each."""
        return self.k + self.v

    def row_bytes(self) -> int:
        """Bytes of one slot's rows across every buffer (what a transfer ships per token)."""
        return sum(b[0].numel() * b.element_size() for b in self.buffers())

    def export_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """A copy of `slots`' rows of every buffer: [num_buffers, len(slots), ...], contiguous."""
        buffers = self.buffers()
        if not buffers:
            return torch.empty(0, dtype=self.dtype)
        return torch.stack([b[slots] for b in buffers])

    def import_rows(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Writes rows exported by a pool of the same model (as bytes or as export_rows gave them)
        into `slots`."""
        buffers = self.buffers()
        if not buffers:
            return
        shape = (len(buffers), slots.numel(), *buffers[0].shape[1:])
        rows = data.view(-1).view(self.dtype).view(shape)
        for buffer, part in zip(buffers, rows, strict=True):
            buffer[slots] = part.to(buffer.device)

    def assert_invariants(self) -> None:
        """Assert the allocator's invariant (for tests and debugging; O(size))."""
        free = self._free[: self._num_free]
        assert free.unique().numel() == self._num_free, "a slot is on the free list twice"
        assert not bool(self._used[free].any()), "a free slot is marked used"
        assert int(self._used.sum()) == self.num_used, "used count disagrees with the free list"
