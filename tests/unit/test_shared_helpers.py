"""The shared bounded maps and log throttle that every service's short memories use."""

from __future__ import annotations

import pytest

from shared.bounded import BoundedDict, BoundedSet
from shared.log import Throttle


def test_bounded_dict_forgets_the_oldest() -> None:
    d: BoundedDict[str, int] = BoundedDict(3)
    for i, k in enumerate("abcd"):
        d[k] = i
    assert list(d) == ["b", "c", "d"]
    d["b"] = 9  # setting again makes it the newest
    d["e"] = 5
    assert list(d.items()) == [("d", 3), ("b", 9), ("e", 5)]


def test_bounded_dict_setdefault_keeps_an_existing_value_and_bounds_new_ones() -> None:
    d: BoundedDict[str, set[int]] = BoundedDict(2)
    d.setdefault("a", set()).add(1)
    d.setdefault("a", set()).add(2)
    assert d["a"] == {1, 2}
    d.setdefault("b", set())
    d.setdefault("c", set())
    assert list(d) == ["b", "c"]


def test_bounded_set_and_size_check() -> None:
    s: BoundedSet[int] = BoundedSet(2)
    for k in (1, 2, 3):
        s.add(k)
    assert 1 not in s and 2 in s and 3 in s
    with pytest.raises(ValueError):
        BoundedDict(0)


def test_throttle_logs_the_first_of_each_key_then_every_nth() -> None:
    t = Throttle(first=2, every=5)
    logged = [n for n in range(1, 13) if t.should_log("x")]
    assert logged == [1, 2, 5, 10]
    assert t.should_log("y")  # another key starts its own count
    assert t.total == 13


def test_throttle_remembers_a_bounded_number_of_keys() -> None:
    t = Throttle(first=1, every=1000, max_keys=2)
    for key in range(100):
        assert t.should_log(key)
    assert len(t.counts) == 2
