"""An approximate prefix tree per DP rank: which prompts each rank has probably cached.

The dispatcher never sees the ranks' real radix caches; it remembers the token ids it sent to each
rank instead. All ranks share one radix tree whose nodes record, per rank ("tenant"), when that
rank last used the node; "rank k's tree" is the set of nodes with tenant k. A rank's size is the
number of tokens on its nodes; past `max_tokens` its least recently used leaves are dropped.

Invariants:
- a node's tenants are a subset of its parent's tenants (a rank that holds a path holds its
  prefixes), so dropping a rank from a node whose children lack it keeps every tree a tree;
- `size[k]` == the sum of `len(node.key)` over the nodes that have tenant k.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

EVICT_TO = 0.9  # evict down to this fraction of the bound, so eviction runs rarely


@dataclass(eq=False)
class Node:
    key: tuple[int, ...] = ()
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)  # first token of child.key -> child
    tenants: dict[int, float] = field(default_factory=dict)  # dp_rank -> last use (a counter)


@dataclass
class Match:
    length: int  # tokens of the prompt matched
    ranks: list[int]  # the candidate ranks with that longest match, ascending


class PrefixTree:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.root = Node()
        self.size: dict[int, int] = {}
        self.clock = 0.0

    def match(self, ids: Sequence[int], candidates: Collection[int]) -> Match:
        """The longest prefix of `ids` that some candidate rank holds, and those ranks."""
        best = Match(0, sorted(candidates))
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            holders = [r for r in child.tenants if r in candidates]
            if not holders:
                break
            n = _common(child.key, ids, pos)
            pos += n
            best = Match(pos, sorted(holders))
            if n < len(child.key):
                break
            node = child
        return best

    def insert(self, ids: Sequence[int], dp_rank: int) -> None:
        """Records that `dp_rank` now holds `ids`; evicts that rank's LRU leaves past the bound."""
        self.clock += 1
        now = self.clock
        node, pos = self.root, 0
        added = 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                leaf = Node(tuple(ids[pos:]), node, {}, {dp_rank: now})
                node.children[ids[pos]] = leaf
                added += len(leaf.key)
                break
            n = _common(child.key, ids, pos)
            if n < len(child.key):
                child = self._split(child, n)
            if dp_rank not in child.tenants:
                added += len(child.key)
            child.tenants[dp_rank] = now
            pos += n
            node = child
        self.size[dp_rank] = self.size.get(dp_rank, 0) + added
        if self.size[dp_rank] > self.max_tokens:
            self.evict(dp_rank, int(self.max_tokens * EVICT_TO))

    def evict(self, dp_rank: int, target: int) -> None:
        """Drops `dp_rank` from its least recently used leaves until it holds <= target tokens."""
        heap = [(n.tenants[dp_rank], id(n), n) for n in self._nodes(dp_rank) if _is_leaf_of(n, dp_rank)]
        heapq.heapify(heap)
        while heap and self.size[dp_rank] > target:
            _, _, node = heapq.heappop(heap)
            if not _is_leaf_of(node, dp_rank):
                continue  # pushed twice, already dropped
            self._drop(node, dp_rank)
            parent = node.parent
            if parent is not None and parent is not self.root and _is_leaf_of(parent, dp_rank):
                heapq.heappush(heap, (parent.tenants[dp_rank], id(parent), parent))

    def forget(self, dp_rank: int) -> None:
        """Drops a rank's whole tree (its process restarted with an empty cache)."""
        for node in sorted(self._nodes(dp_rank), key=_depth, reverse=True):
            self._drop(node, dp_rank)
        self.size.pop(dp_rank, None)

    def _drop(self, node: Node, dp_rank: int) -> None:
        del node.tenants[dp_rank]
        self.size[dp_rank] -= len(node.key)
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[node.key[0]]

    def _split(self, child: Node, n: int) -> Node:
        """Cuts child's key after n tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:n], parent, {}, dict(child.tenants))
        child.key = child.key[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    def _nodes(self, dp_rank: int) -> list[Node]:
        out, stack = [], [c for c in self.root.children.values() if dp_rank in c.tenants]
        while stack:
            node = stack.pop()
            out.append(node)
            stack += [c for c in node.children.values() if dp_rank in c.tenants]
        return out


def _common(key: tuple[int, ...], ids: Sequence[int], pos: int) -> int:
    n = 0
    limit = min(len(key), len(ids) - pos)
    while n < limit and key[n] == ids[pos + n]:
        n += 1
    return n


def _is_leaf_of(node: Node, dp_rank: int) -> bool:
    return dp_rank in node.tenants and not any(dp_rank in c.tenants for c in node.children.values())


def _depth(node: Node) -> int:
    d = 0
    while node.parent is not None:
        node, d = node.parent, d + 1
    return d
