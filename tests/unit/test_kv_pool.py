"""KVPool: allocation, accounting, capacity, double free."""

import pytest
import torch

from services.scheduler.model.kv_pool import KVPool


def make_pool(size: int = 16) -> KVPool:
    return KVPool(num_layers=2, size=size, num_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")


def test_shapes() -> None:
    pool = make_pool(8)
    assert len(pool.k) == len(pool.v) == 2
    assert pool.k[0].shape == pool.v[1].shape == (8, 2, 4)
    assert pool.size == 8 and pool.num_free == 8


def test_alloc_free_accounting() -> None:
    pool = make_pool(16)
    a = pool.alloc(5)
    b = pool.alloc(7)
    assert a is not None and b is not None
    assert a.dtype == torch.long and a.numel() == 5 and b.numel() == 7
    assert len(set(a.tolist()) | set(b.tolist())) == 12  # disjoint
    assert pool.num_free == 4 and pool.num_free + pool.num_used == pool.size
    pool.assert_invariants()
    pool.free(a)
    assert pool.num_free == 9
    pool.assert_invariants()
    c = pool.alloc(9)
    assert c is not None and not set(c.tolist()) & set(b.tolist())
    assert pool.num_free == 0
    pool.free(torch.cat([b, c]))
    assert pool.num_free == 16
    pool.assert_invariants()


def test_alloc_zero_and_beyond_capacity() -> None:
    pool = make_pool(4)
    empty = pool.alloc(0)
    assert empty is not None and empty.numel() == 0
    assert pool.alloc(5) is None
    assert pool.num_free == 4  # a failed alloc takes nothing
    s = pool.alloc(4)
    assert s is not None and sorted(s.tolist()) == [0, 1, 2, 3]
    assert pool.alloc(1) is None


def test_double_free_raises() -> None:
    pool = make_pool(8)
    s = pool.alloc(3)
    assert s is not None
    pool.free(s[:1])
    with pytest.raises(ValueError):
        pool.free(s[:1])
    with pytest.raises(ValueError):
        pool.free(s[1:].repeat(2))  # the same slot twice in one call
    assert pool.num_free == 6  # failed frees change nothing
    pool.assert_invariants()
    with pytest.raises(ValueError):
        pool.free(torch.tensor([100]))
    pool.free(s[1:])
    assert pool.num_free == 8
    pool.assert_invariants()


def test_churn_keeps_invariant() -> None:
    pool = make_pool(32)
    g = torch.Generator().manual_seed(0)
    held: list[torch.Tensor] = []
    for _ in range(200):
        if held and torch.rand(1, generator=g).item() < 0.5:
            pool.free(held.pop(int(torch.randint(len(held), (1,), generator=g))))
        else:
            s = pool.alloc(int(torch.randint(1, 6, (1,), generator=g)))
            if s is not None:
                held.append(s)
        assert pool.num_free + sum(h.numel() for h in held) == pool.size
    pool.assert_invariants()
