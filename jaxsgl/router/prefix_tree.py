"""An approximate picture of what each worker caches: a radix tree over the text of requests
recently sent to it.

The router never sees a worker's real radix cache (token ids, pages, evictions). It remembers
instead which worker got which request text: a worker that served a prefix recently probably
still caches it. Characters stand in for tokens, so the tree works for any worker and any
tokenizer. Each worker's share is bounded (`max_chars_per_worker`): past it, the worker's least
recently matched leaves are forgotten first, through a heap per worker (no scan).

Worked example:

    insert("You are a bot. Hi", "w0")     root ── "You are a bot. Hi" {w0}
    insert("You are a bot. Bye", "w1")    root ── "You are a bot. " {w0 w1} ─┬─ "Hi" {w0}
                                                                          └─ "Bye" {w1}
    match("You are a bot. Hint")  ->  {w0: 17, w1: 15}
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable

Worker = Hashable


class _Node:
    __slots__ = ("key", "parent", "children", "last_use")

    def __init__(self, key: str, parent: _Node | None):
        self.key = key
        self.parent = parent
        self.children: dict[str, _Node] = {}  # by first character
        self.last_use: dict[Worker, int] = {}  # workers that hold this node -> last use tick


class PrefixTree:
    def __init__(self, max_chars_per_worker: int = 1 << 20):
        self.max_chars = max_chars_per_worker
        self.root = _Node("", None)
        self.num_chars: dict[Worker, int] = {}  # characters held per worker
        self._heaps: dict[Worker, list[tuple[int, int, _Node]]] = {}  # (tick, id, leaf)
        self._tick = itertools.count(1)

    # -- queries -----------------------------------------------------------------------------
    def match(self, text: str) -> dict[Worker, int]:
        """For each worker holding some prefix of `text`, the length of its longest one."""
        matched: dict[Worker, int] = {}
        node, depth = self.root, 0
        while depth < len(text):
            child = node.children.get(text[depth])
            if child is None:
                break
            n = _common(child.key, text, depth)
            for w in child.last_use:
                matched[w] = depth + n
            if n < len(child.key):
                break
            node, depth = child, depth + n
        return matched

    # -- updates -----------------------------------------------------------------------------
    def insert(self, text: str, worker: Worker) -> None:
        """Record that `worker` got `text`; then forget its oldest text past the bound."""
        tick = next(self._tick)
        self.num_chars.setdefault(worker, 0)
        node, depth = self.root, 0
        while depth < len(text):
            child = node.children.get(text[depth])
            if child is None:
                child = _Node(text[depth:], node)
                node.children[text[depth]] = child
            else:
                n = _common(child.key, text, depth)
                if n < len(child.key):
                    child = self._split(child, n)
            if worker not in child.last_use:
                self.num_chars[worker] += len(child.key)
            child.last_use[worker] = tick
            node, depth = child, depth + len(child.key)
        if node is not self.root:
            self._push_leafward(node, worker)
        self._evict(worker)

    def remove_worker(self, worker: Worker) -> None:
        """Forget everything about `worker` (it left the pool)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.last_use.pop(worker, None) is not None and not node.last_use:
                self._drop(node)
        self.num_chars.pop(worker, None)
        self._heaps.pop(worker, None)

    def _split(self, child: _Node, n: int) -> _Node:
        """Cut `child` after n characters; the upper part keeps every holder."""
        parent = child.parent
        upper = _Node(child.key[:n], parent)
        upper.last_use = dict(child.last_use)
        parent.children[child.key[0]] = upper
        child.key, child.parent = child.key[n:], upper
        upper.children[child.key[0]] = child
        for w in upper.last_use:
            self.num_chars[w] += n  # both parts count their own characters
        for w in child.last_use:
            self.num_chars[w] -= n
        return upper

    def _push_leafward(self, node: _Node, worker: Worker) -> None:
        """Queue the deepest node of `worker` on this path for eviction, if it is a leaf of
        that worker (no child the worker holds)."""
        if not any(worker in c.last_use for c in node.children.values()):
            entry = (node.last_use[worker], id(node), node)
            heapq.heappush(self._heaps.setdefault(worker, []), entry)

    def _evict(self, worker: Worker) -> None:
        heap = self._heaps.get(worker, [])
        while self.num_chars[worker] > self.max_chars and heap:
            tick, _, node = heapq.heappop(heap)
            if node.last_use.get(worker) != tick:
                continue  # used again since, or already forgotten: a stale entry
            if any(worker in c.last_use for c in node.children.values()):
                continue  # no longer this worker's leaf
            del node.last_use[worker]
            self.num_chars[worker] -= len(node.key)
            parent = node.parent
            if not node.last_use:
                self._drop(node)
            if parent is not self.root and worker in parent.last_use:
                self._push_leafward(parent, worker)

    def _drop(self, node: _Node) -> None:
        """Unlink a node no worker holds; its children (held by nobody either) go with it."""
        if node.parent is not None and node.parent.children.get(node.key[:1]) is node:
            del node.parent.children[node.key[:1]]

    # -- invariants --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Each worker's count equals the characters of the nodes it holds; a holder of a node
        holds its parent; no node is empty or held by nobody; children keyed by first char."""
        counted: dict[Worker, int] = dict.fromkeys(self.num_chars, 0)
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, child in node.children.items():
                assert child.key and child.key[0] == first and child.parent is node
                assert child.last_use, "a node nobody holds"
                if node is not self.root:
                    assert set(child.last_use) <= set(node.last_use), "holder skips a parent"
                for w in child.last_use:
                    counted[w] += len(child.key)
                stack.append(child)
        assert counted == self.num_chars, (counted, self.num_chars)
        for w, n in self.num_chars.items():
            assert n <= self.max_chars or not self._heaps.get(w), (w, n)


def _common(key: str, text: str, start: int) -> int:
    """Length of the common prefix of `key` and `text[start:]`."""
    n = min(len(key), len(text) - start)
    i = 0
    while i < n and key[i] == text[start + i]:
        i += 1
    return i
