"""Bounded, insertion-ordered maps: remember the last N keys, forget the oldest first.

Services keep short memories of what they have seen (fenced rids, retired rank instances, recently
finished requests, keys already logged) that a flood of distinct keys must not grow without end.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(dict[K, V]):
    """A dict of at most `maxlen` entries. Setting a key (new or not) makes it the newest; past
    `maxlen` the oldest entries are dropped."""

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.maxlen = maxlen

    def __setitem__(self, key: K, value: V) -> None:
        super().pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.maxlen:
            del self[next(iter(self))]

    def setdefault(self, key: K, default: V) -> V:  # type: ignore[override]
        if key in self:
            return self[key]
        self[key] = default
        return default


class BoundedSet(BoundedDict[K, None]):
    """A set of the last `maxlen` keys added."""

    def add(self, key: K) -> None:
        self[key] = None
