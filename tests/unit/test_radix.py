"""RadixTree and CacheManager on tiny pools: insert, match, split, lock, evict, accounting."""

from __future__ import annotations

import random

import torch

from services.scheduler.cache import CacheManager
from services.scheduler.model.kv_pool import KVPool
from services.scheduler.radix import RadixTree
from services.scheduler.request import Req
from services.scheduler.table import ReqToTokenTable
from shared.messages import SamplingParams


def slots(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.long)


def test_insert_match_split() -> None:
    t = RadixTree()
    assert t.insert([1, 2, 3, 4], slots(10, 11, 12, 13)) == 0
    assert t.insert([1, 2, 5], slots(20, 21, 22)) == 2  # 1,2 present: caller frees 20, 21
    assert t.total_size == 5 and t.evictable_size == 5
    got, node = t.match([1, 2, 3, 9])
    assert got.tolist() == [10, 11, 12] and node.key == [3]  # the [3, 4] edge was split
    got, node = t.match([1, 2, 5, 6])
    assert got.tolist() == [10, 11, 22]
    assert t.match([7])[0].numel() == 0
    assert t.match_len([1, 2, 3, 4, 5]) == 4 and t.match_len([1, 3]) == 1
    t.assert_invariants()


def test_lock_protects_from_eviction_and_lru_order() -> None:
    t = RadixTree()
    t.insert([1, 2, 3], slots(0, 1, 2))
    t.insert([4, 5], slots(3, 4))
    t.insert([6], slots(5))
    _, held = t.match([1, 2, 3])
    t.lock(held)
    assert (t.protected_size, t.evictable_size) == (3, 3)
    t.match([6])  # most recent: [4, 5] is the LRU unlocked leaf
    assert t.evict(1).tolist() == [3, 4]
    assert t.evict(100).tolist() == [5]  # the locked path stays
    assert t.total_size == 3
    t.unlock(held)
    assert t.evict(100).tolist() == [0, 1, 2] and t.total_size == 0
    t.assert_invariants()


def test_evict_walks_up_to_parents() -> None:
    t = RadixTree()
    t.insert([1, 2, 3], slots(0, 1, 2))
    t.insert([1, 2, 4], slots(0, 1, 3))  # splits [1,2] | [3], [4]
    assert sorted(t.evict(10).tolist()) == [0, 1, 2, 3]
    assert not t.root.children


def req(ids: list[int]) -> Req:
    return Req(rid="r", gateway_id="g", input_ids=ids, sampling=SamplingParams())


def test_cache_manager_random_operations_keep_accounting() -> None:
    rng = random.Random(0)
    pool = KVPool(num_layers=1, size=64, num_kv_heads=1, head_dim=2)
    table = ReqToTokenTable(8, 64)
    cache = CacheManager(pool, table)
    holders: list[Req] = []
    vocab = [1, 2, 3]  # a small alphabet: many shared prefixes, many splits
    for _ in range(2000):
        op = rng.random()
        if op < 0.4 and len(holders) < 8:
            r = req([rng.choice(vocab) for _ in range(rng.randint(2, 12))])
            cache.admit(r, r.seq_len - 1)
            need = r.seq_len - r.cached_len
            got = cache.alloc(need)
            if got is None:
                cache.release(r, keep=False)
            else:
                cache.assign(r, got)
                r.cached_len += need
                holders.append(r)
        elif holders:
            r = holders.pop(rng.randrange(len(holders)))
            cache.release(r, keep=rng.random() < 0.7)
        cache.assert_invariants(holders)
        assert pool.num_free + cache.cached_size + sum(r.cached_len - r.tree_len for r in holders) == 64
    for r in holders:
        cache.release(r, keep=True)
    cache.assert_invariants([])
    assert cache.tree is not None and cache.tree.protected_size == 0
    cache.flush()
    assert pool.num_free == 64
    pool.assert_invariants()


def test_match_returns_slots_with_the_cached_kv() -> None:
    pool = KVPool(num_layers=1, size=16, num_kv_heads=1, head_dim=2)
    cache = CacheManager(pool, ReqToTokenTable(4, 16))
    a = req([5, 6, 7, 8])
    cache.admit(a, 3)
    s = cache.alloc(4)
    assert s is not None
    cache.assign(a, s)
    a.cached_len = 4
    cache.release(a, keep=True)
    b = req([5, 6, 7, 9, 1])
    cache.admit(b, 4)
    assert b.cached_len == b.tree_len == 3
    assert cache.table.slots[b.row, :3].tolist() == s[:3].tolist()
    assert cache.tree is not None and cache.tree.protected_size == 3
    cache.release(b, keep=False)
    cache.assert_invariants([])
