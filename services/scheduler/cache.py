"""CacheManager: the KV pool's slots, the req-to-token table and the (optional) radix tree.

Accounting, checkable at any step boundary:
    pool.num_free + tree.total_size + sum(cached_len - tree_len over requests holding a row)
        == pool.size
A request's prefix [0, tree_len) belongs to the tree (locked while the request holds it); its
own slots [tree_len, cached_len) belong to the request until it finishes, is retracted or aborted.
Allocation evicts unlocked tree leaves (LRU) when the free list is short.
"""

from __future__ import annotations

import torch

from services.scheduler.model.kv_pool import KVPool
from services.scheduler.radix import RadixTree
from services.scheduler.request import Req
from services.scheduler.table import ReqToTokenTable


class CacheManager:
    def __init__(self, pool: KVPool, table: ReqToTokenTable, use_radix: bool = True) -> None:
        self.pool = pool
        self.table = table
        self.tree: RadixTree | None = RadixTree() if use_radix else None
        self.hit_tokens = 0  # prompt tokens matched at admission
        self.prompt_tokens = 0  # tokens to prefill at admission (a migrated request: prompt + earlier output)

    # --- sizes --------------------------------------------------------------------------------

    @property
    def cached_size(self) -> int:
        return self.tree.total_size if self.tree else 0

    @property
    def evictable_size(self) -> int:
        return self.tree.evictable_size if self.tree else 0

    @property
    def available(self) -> int:
        """Slots an allocation may get: free ones plus evictable cached ones."""
        return self.pool.num_free + self.evictable_size

    @property
    def used_by_requests(self) -> int:
        """Slots that nothing can reclaim now: request-owned plus locked prefixes."""
        return self.pool.size - self.available

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    # --- request lifecycle ----------------------------------------------------------------------

    def admit(self, req: Req, match_limit: int) -> None:
        """Gives `req` a table row and reuses the longest cached prefix of all_ids[:match_limit]."""
        req.row = self.table.alloc()
        req.cached_len = req.tree_len = 0
        req.node = None
        if self.tree is not None and match_limit > 0:
            slots, node = self.tree.match(req.all_ids[:match_limit])
            if slots.numel():
                self.tree.lock(node)
                req.node = node
                req.tree_len = req.cached_len = slots.numel()
                self.table.slots[req.row, : req.cached_len] = slots
        if not req.admitted:
            req.admitted = True
            req.cached_tokens = req.cached_len
            self.hit_tokens += req.cached_len
            self.prompt_tokens += len(req.all_ids)

    def alloc(self, n: int) -> torch.Tensor | None:
        """n slots, evicting cached prefixes if needed; None if even that is not enough."""
        if n > self.available:
            return None
        short = n - self.pool.num_free
        if short > 0 and self.tree is not None:
            self.pool.free(self.tree.evict(short))
        return self.pool.alloc(n)

    def assign(self, req: Req, slots: torch.Tensor) -> None:
        """Writes the step's slots for req's next extend_now tokens into its table row."""
        self.table.slots[req.row, req.cached_len : req.cached_len + slots.numel()] = slots

    def cache_prefix(self, req: Req) -> None:
        """Shares req's computed tokens with later requests while it runs (after a prefill step):
        inserts [0, cached_len) and locks it for req, so tree_len becomes cached_len."""
        if self.tree is None or req.cached_len <= req.tree_len:
            return
        row = self.table.slots[req.row]
        ids = req.all_ids[: req.cached_len]
        present = self.tree.insert(ids, row[: req.cached_len])
        self.pool.free(row[req.tree_len : max(present, req.tree_len)].clone())  # duplicates
        slots, node = self.tree.match(ids)
        assert slots.numel() == req.cached_len
        row[: req.cached_len] = slots
        self.tree.lock(node)
        if req.node is not None:
            self.tree.unlock(req.node)
        req.node, req.tree_len = node, req.cached_len

    def release(self, req: Req, keep: bool) -> None:
        """Ends req's hold on KV: with `keep`, its computed tokens go into the tree (finish,
        retraction); otherwise its own slots are freed (abort, failed step)."""
        row = self.table.slots[req.row]
        own = row[req.tree_len : req.cached_len].clone()
        if self.tree is not None and keep and req.cached_len > 0:
            ids = req.all_ids[: req.cached_len]
            present = self.tree.insert(ids, row[: req.cached_len])
            self.pool.free(row[req.tree_len : max(present, req.tree_len)].clone())  # duplicates
        else:
            self.pool.free(own)
        if self.tree is not None and req.node is not None:
            self.tree.unlock(req.node)
        self.table.free(req.row)
        req.row, req.node, req.tree_len = -1, None, 0

    def flush(self) -> int:
        """Drops every unlocked cached prefix; returns how many slots it freed."""
        if self.tree is None:
            return 0
        slots = self.tree.reset()
        self.pool.free(slots)
        return slots.numel()

    def assert_invariants(self, holders: list[Req]) -> None:
        own = sum(r.cached_len - r.tree_len for r in holders)
        total = self.pool.num_free + self.cached_size + own
        assert total == self.pool.size, (self.pool.num_free, self.cached_size, own, self.pool.size)
        assert self.table.num_free + len(holders) == self.table.slots.shape[0]
        if self.tree is not None:
            self.tree.assert_invariants()
