"""A radix tree over token ids whose nodes own KV-pool slots: the prefix cache.

Invariants:
- every node but the root has a non-empty `key` (token ids) and a `value` of the same length
  (their KV slots); children are keyed by the first token of their key;
- a slot is owned by at most one node; `total_size` == sum of len(value) over all nodes;
- `lock_ref` of a node counts the running requests whose matched prefix ends at or below it;
  `protected_size` sums the nodes with lock_ref > 0, `evictable_size` the others;
- only unlocked leaves are evicted (least recently used first), so a locked path stays whole.
"""

from __future__ import annotations

import heapq
import itertools

import torch

_clock = itertools.count()


class Node:
    __slots__ = ("key", "value", "parent", "children", "lock_ref", "last_access")

    def __init__(self, key: list[int], value: torch.Tensor, parent: Node | None) -> None:
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[int, Node] = {}
        self.lock_ref = 0
        self.last_access = next(_clock)

    def __lt__(self, other: Node) -> bool:  # for the eviction heap
        return self.last_access < other.last_access


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class RadixTree:
    def __init__(self) -> None:
        self.root = Node([], torch.empty(0, dtype=torch.long), None)
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0
        self.protected_size = 0

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    # --- lookup -----------------------------------------------------------------------------

    def match(self, ids: list[int]) -> tuple[torch.Tensor, Node]:
        """The slots of the longest cached prefix of `ids` and the node where it ends (a node
        that ends mid-key is split so the match ends on a node boundary)."""
        node, pos, parts = self.root, 0, []
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            n = _common_len(child.key, ids[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = next(_clock)
            parts.append(child.value)
            node, pos = child, pos + n
        slots = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        return slots, node

    def match_len(self, ids: list[int]) -> int:
        """Length of the longest cached prefix of `ids`, changing nothing."""
        node, pos = self.root, 0
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                break
            n = _common_len(child.key, ids[pos:])
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

    def _split(self, child: Node, n: int) -> Node:
        """Cut `child` after its first n tokens; returns the new upper node."""
        assert child.parent is not None and 0 < n < len(child.key)
        upper = Node(child.key[:n], child.value[:n], child.parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        child.parent.children[child.key[0]] = upper
        child.key, child.value = child.key[n:], child.value[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    # --- insert -----------------------------------------------------------------------------

    def insert(self, ids: list[int], slots: torch.Tensor) -> int:
        """Cache `ids` with their KV at `slots`; returns how many leading tokens were cached
        already (the tree keeps its own slots for those: the caller frees its copies)."""
        assert len(ids) == slots.numel()
        node, pos = self.root, 0
        while pos < len(ids):
            node.last_access = next(_clock)
            child = node.children.get(ids[pos])
            if child is None:
                leaf = Node(ids[pos:], slots[pos:].clone(), node)
                node.children[ids[pos]] = leaf
                self.evictable_size += len(leaf.key)
                return pos
            n = _common_len(child.key, ids[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            node, pos = child, pos + n
        node.last_access = next(_clock)
        return pos

    # --- locks ------------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None
            node = node.parent

    def unlock(self, node: Node) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock of an unlocked node"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            assert node.parent is not None
            node = node.parent

    # --- eviction ---------------------------------------------------------------------------

    def evict(self, num_tokens: int) -> torch.Tensor:
        """Removes unlocked leaves, least recently used first, until at least `num_tokens` slots
        are released or none is left; returns the released slots (the caller frees them)."""
        heap = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(heap)
        freed: list[torch.Tensor] = []
        count = 0
        while heap and count < num_tokens:
            leaf = heapq.heappop(heap)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self.evictable_size -= len(leaf.key)
            freed.append(leaf.value)
            count += len(leaf.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        return torch.cat(freed) if freed else torch.empty(0, dtype=torch.long)

    def reset(self) -> torch.Tensor:
        """Drops every unlocked node (FlushCache); returns their slots."""
        return self.evict(self.evictable_size)

    def _nodes(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node is not self.root:
                out.append(node)
        return out

    def assert_invariants(self) -> None:
        """Asserts the size bookkeeping (tests, debugging; O(nodes))."""
        nodes = self._nodes()
        locked = sum(len(n.key) for n in nodes if n.lock_ref > 0)
        free = sum(len(n.key) for n in nodes if n.lock_ref == 0)
        assert (locked, free) == (self.protected_size, self.evictable_size), (locked, free)
        for n in nodes:
            assert n.key and len(n.key) == n.value.numel()
            assert n.parent is not None and n.parent.children[n.key[0]] is n
