"""RadixAttention's prefix cache: a radix tree over token ids whose nodes hold KV pages.

Only whole pages are stored. A node's `key` is a run of len(pages) * page_size token ids and
its children are indexed by the token tuple of their first page. Worked example, page_size 2:

    insert([1 2 3 4 5 6], pages [7 3 9])   root ── [1 2 3 4 5 6] [7 3 9]
    match_prefix([1 2 3 4 8 8 0])           root ── [1 2 3 4] [7 3] ── [5 6] [9]
      -> pages [7 3], num_tokens 4, node = the new [1 2 3 4] node (the split keeps the
         [5 6] node's identity, so locks held on it stay valid); the lone 0 never matches.

Ownership and locking (DESIGN §2). The tree owns the pages of its nodes; `evict` and `flush`
hand pages back to the caller, who returns them to the allocator. A running request `lock`s the
node its prefix ends at, which protects that node and all its ancestors; `unlock` releases it.
Only unlocked leaves are evicted, least recently used first, via a heap of exactly the evictable
leaves (each node knows its heap slot), so evicting k pages costs O(k log N), never a scan.
`pin` is a lock the cache holds itself, for a warmed-up system prompt. Single-threaded: only the
scheduler calls this.
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

Tokens = Sequence[int] | np.ndarray


class Node:
    """A run of whole pages. `lock_ref` counts locks on this node or below it (so it is >= every
    child's), `pin_count` the cache's pins on exactly this node (each also holds one lock).
    `removed` turns True when the node is evicted or flushed: a MatchResult ending at a removed
    node is stale (match again); while `removed` is False all of its pages are still cached."""

    __slots__ = (
        "key", "pages", "parent", "children", "lock_ref", "pin_count", "last_access",
        "heap_index", "removed",
    )  # fmt: skip

    def __init__(self, key: tuple[int, ...], pages: list[int], parent: Node | None, tick: int):
        self.key = key
        self.pages = pages
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0
        self.pin_count = 0
        self.last_access = tick  # a parent's is always >= its children's
        self.heap_index = -1  # slot in the evictable-leaf heap; -1 when not there
        self.removed = False

    def __repr__(self) -> str:
        key = f"{list(self.key[:8])}{'...' if len(self.key) > 8 else ''}"
        return f"Node(key={key}, pages={self.pages}, lock_ref={self.lock_ref})"


@dataclass(frozen=True)
class MatchResult:
    """The longest cached whole-page prefix: its pages, len(pages) * page_size tokens, and the
    node it ends at (the namespace's root if nothing matched). Lock `node` to keep the pages."""

    pages: list[int]
    num_tokens: int
    node: Node


class _LeafHeap:
    """Min-heap of nodes by `last_access`. Each node stores its slot, so removing any node or
    re-sorting one whose time grew is O(log N); the heap holds no stale entries."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.steps = 0  # pushes, pops and sift moves: tests check eviction is O(k log N)

    def push(self, node: Node) -> None:
        assert node.heap_index == -1, node
        self.nodes.append(node)
        self.steps += 1
        self._sift_up(len(self.nodes) - 1)

    def remove(self, node: Node) -> None:
        i = node.heap_index
        assert self.nodes[i] is node, node
        last = self.nodes.pop()
        node.heap_index = -1
        self.steps += 1
        if last is not node:
            self._place(last, i)
            self._sift_up(i)
            self._sift_down(last.heap_index)

    def touched(self, node: Node) -> None:
        self._sift_down(node.heap_index)  # its time only grows: it can only move down

    def _place(self, node: Node, i: int) -> None:
        self.nodes[i] = node
        node.heap_index = i

    def _sift_up(self, i: int) -> None:
        node = self.nodes[i]
        while i > 0 and self.nodes[(i - 1) // 2].last_access > node.last_access:
            self._place(self.nodes[(i - 1) // 2], i)
            i = (i - 1) // 2
            self.steps += 1
        self._place(node, i)

    def _sift_down(self, i: int) -> None:
        nodes, node = self.nodes, self.nodes[i]
        while (c := 2 * i + 1) < len(nodes):
            if c + 1 < len(nodes) and nodes[c + 1].last_access < nodes[c].last_access:
                c += 1
            if node.last_access <= nodes[c].last_access:
                break
            self._place(nodes[c], i)
            i = c
            self.steps += 1
        self._place(node, i)


class RadixCache:
    """Prefix cache at page granularity, one tree per namespace (namespaces share no node and no
    page). With `disable=True` nothing is ever cached: matches are empty and `insert` keeps no
    page (the no-sharing baseline), but every call still works."""

    def __init__(self, page_size: int, disable: bool = False) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.disable = disable
        self._roots: dict[str, Node] = {}
        self._pages: set[int] = set()
        self._num_evictable = 0
        self._heap = _LeafHeap()  # exactly the unlocked, unpinned, childless non-root nodes
        self._clock = itertools.count(1)  # LRU time: one tick per match/insert/pin
        self._pinned: set[Node] = set()  # nodes with pin_count > 0 (splits keep their identity)

    @property
    def num_cached_pages(self) -> int:
        return len(self._pages)

    @property
    def num_evictable_pages(self) -> int:
        """Pages in nodes with lock_ref 0 (neither locked nor pinned, nor above such a node)."""
        return self._num_evictable

    @property
    def num_locked_pages(self) -> int:
        return len(self._pages) - self._num_evictable

    @property
    def num_pinned_pages(self) -> int:
        """Pages that pins hold: on pinned nodes and their ancestors. No eviction frees them,
        so requests must fit in the rest of the pool. O(pinned path length)."""
        seen: set[Node] = set()
        for node in self._pinned:
            for n in _path_to_root(node):
                if n in seen:
                    break
                seen.add(n)
        return sum(len(n.pages) for n in seen)

    @property
    def num_heap_steps(self) -> int:
        """Heap operations so far (diagnostics: eviction work grows as O(k log N))."""
        return self._heap.steps

    def all_pages(self) -> list[int]:
        """Every page the tree owns (for the engine's page accounting)."""
        return list(self._pages)

    def match_prefix(self, tokens: Tokens, namespace: str = "") -> MatchResult:
        """Longest cached prefix of `tokens` made of whole pages; tokens past the last whole page
        never match. Splits the node the match ends inside, and marks the path as just used."""
        root = self._root(namespace)
        if self.disable:
            return MatchResult([], 0, root)
        key = _as_key(tokens)
        node, num_tokens = self._descend(root, key[: len(key) - len(key) % self.page_size])
        chunks = [n.pages for n in _path_to_root(node)]
        pages = [p for chunk in reversed(chunks) for p in chunk]
        assert len(pages) * self.page_size == num_tokens
        return MatchResult(pages, num_tokens, node)

    def insert(self, tokens: Tokens, pages: Sequence[int], namespace: str = "") -> int:
        """Caches `tokens`' whole pages, whose KV lives in `pages` (one per whole page; a partial
        last page is ignored). Returns how many tokens were already cached before the call, a
        multiple of page_size. Ownership: the tree takes `pages[already // page_size:]`; the
        caller keeps `pages[:already // page_size]`, where the tree keeps its own pages. Of
        those, the ones the caller got from `match_prefix` are the tree's (nothing to do); any
        others duplicate cached KV and the caller frees them. With `disable=True` the tree takes
        nothing and the return is the whole-page length, so the caller frees every page.

        Example, page_size 2, [1 2 3 4] cached as [7 3]: a request that matched nothing computed
        [1 2 3 4 5 6] into [4 5 6]; insert returns 4, the tree adopts page 6, the caller frees
        4 and 5."""
        key = _as_key(tokens)
        num_pages = len(key) // self.page_size
        if len(pages) != num_pages:
            raise ValueError(
                f"insert got {len(pages)} pages for {len(key)} tokens "
                f"({num_pages} whole pages of {self.page_size})"
            )
        root = self._root(namespace)
        if self.disable:
            return num_pages * self.page_size
        key = key[: num_pages * self.page_size]
        node, already = self._descend(root, key)
        new_pages = [operator.index(p) for p in pages[already // self.page_size :]]
        if not new_pages:
            return already
        if len(set(new_pages)) != len(new_pages) or not self._pages.isdisjoint(new_pages):
            raise ValueError(f"insert: pages {new_pages} repeat or are already cached")
        leaf = Node(key[already:], new_pages, node, node.last_access)
        node.children[leaf.key[: self.page_size]] = leaf
        if node.heap_index >= 0:
            self._heap.remove(node)  # no longer a leaf
        self._heap.push(leaf)
        self._pages.update(new_pages)
        self._num_evictable += len(new_pages)
        return already

    def lock(self, node: Node) -> None:
        """Protects `node` and its ancestors from eviction until the matching `unlock`."""
        if node.removed:
            raise ValueError(f"cannot lock {node!r}: it was evicted (lock right after matching)")
        for n in _path_to_root(node):
            if n.lock_ref == 0 and n.parent is not None:
                self._num_evictable -= len(n.pages)
                if n.heap_index >= 0:
                    self._heap.remove(n)
            n.lock_ref += 1

    def unlock(self, node: Node) -> None:
        """Releases one `lock(node)`; an unlock without a lock is an AssertionError."""
        assert node.lock_ref > 0, f"unlock of unlocked {node!r}"  # ancestors are >= node
        for n in _path_to_root(node):
            n.lock_ref -= 1
            if n.lock_ref == 0 and n.parent is not None:
                self._num_evictable += len(n.pages)
                if not n.children:
                    self._heap.push(n)

    def evict(self, num_pages: int) -> list[int]:
        """Removes least recently used unlocked leaves (a parent becomes a candidate once its
        children are gone) until >= num_pages pages are released or none is evictable; returns
        the released pages, now the caller's to free. Whole nodes go, so it may release more."""
        if num_pages < 0:
            raise ValueError(f"cannot evict a negative number of pages: {num_pages}")
        released: list[int] = []
        while len(released) < num_pages and self._heap.nodes:
            leaf = self._heap.nodes[0]
            self._heap.remove(leaf)
            assert leaf.lock_ref == 0 and not leaf.children, leaf
            parent = leaf.parent
            del parent.children[leaf.key[: self.page_size]]
            self._forget(leaf)
            released += leaf.pages
            if parent.parent is not None and parent.lock_ref == 0 and not parent.children:
                self._heap.push(parent)
        logger.debug("evicted %d pages (asked %d)", len(released), num_pages)
        return released

    def flush(self) -> list[int]:
        """Drops every node that is neither locked nor pinned; returns their pages."""
        released: list[int] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            for first, child in list(node.children.items()):
                if child.lock_ref > 0:
                    stack.append(child)
                    continue
                del node.children[first]
                dropped = [child]
                while dropped:  # lock_ref 0 here means 0 in the whole subtree
                    n = dropped.pop()
                    dropped.extend(n.children.values())
                    self._forget(n)
                    released += n.pages
        for n in self._heap.nodes:
            assert n.removed, n  # every evictable leaf was just dropped
        self._heap.nodes.clear()
        assert self._num_evictable == 0
        logger.info("flushed %d cached pages", len(released))
        return released

    def pin(self, tokens: Tokens, namespace: str = "") -> int:
        """Pins the longest cached whole-page prefix of `tokens` (the namespace root if none)
        so that no `evict` or `flush` drops it; returns its length in tokens. Pins nest: each
        needs its own `unpin`."""
        match = self.match_prefix(tokens, namespace)
        self.lock(match.node)
        match.node.pin_count += 1
        self._pinned.add(match.node)
        return match.num_tokens

    def unpin(self, tokens: Tokens, namespace: str = "") -> None:
        """Releases one pin: the deepest pinned node on `tokens`' cached path. A pin made when
        less was cached sits higher and goes once the deeper ones are released."""
        ps, key = self.page_size, _as_key(tokens)
        node = pinned = self._root(namespace)
        pos = 0
        while (child := node.children.get(key[pos : pos + ps])) is not None:
            if key[pos : pos + len(child.key)] != child.key:
                break
            node, pos = child, pos + len(child.key)
            if node.pin_count:
                pinned = node
        if pinned.pin_count == 0:
            raise ValueError(f"unpin: no pinned prefix of these tokens in namespace {namespace!r}")
        pinned.pin_count -= 1
        if pinned.pin_count == 0:
            self._pinned.discard(pinned)
        self.unlock(pinned)

    def check_integrity(self) -> None:
        """Asserts every invariant of the tree, its counters and its heap. O(N): for tests."""
        ps, seen, evictable, leaves, pinned = self.page_size, set(), 0, 0, set()
        for root in self._roots.values():
            assert root.parent is None and not root.key and not root.pages and not root.removed
            assert root.heap_index == -1
            stack = [root]
            while stack:
                node = stack.pop()
                assert node.pin_count >= 0, node
                if node.pin_count:
                    pinned.add(node)
                assert node.lock_ref >= node.pin_count + sum(
                    c.lock_ref for c in node.children.values()
                ), node
                for first, child in node.children.items():
                    assert child.parent is node and not child.removed, child
                    assert first == child.key[:ps] and len(first) == ps, child
                    assert child.key and len(child.key) == len(child.pages) * ps, child
                    assert child.last_access <= node.last_access, child
                    stack.append(child)
                if node is root:
                    continue
                assert seen.isdisjoint(node.pages), node
                seen.update(node.pages)
                is_leaf = node.lock_ref == 0 and not node.children
                assert (node.heap_index >= 0) == is_leaf, node
                evictable += len(node.pages) if node.lock_ref == 0 else 0
                leaves += is_leaf
        assert seen == self._pages and evictable == self._num_evictable
        assert pinned == self._pinned, (pinned, self._pinned)
        assert not (self.disable and self._pages)
        heap = self._heap.nodes
        assert len(heap) == leaves
        for i, n in enumerate(heap):
            assert n.heap_index == i and (i == 0 or heap[(i - 1) // 2].last_access <= n.last_access)

    def _root(self, namespace: str) -> Node:
        root = self._roots.get(namespace)
        if root is None:
            if not isinstance(namespace, str):
                raise ValueError(f"namespace must be a str, got {namespace!r}")
            root = self._roots[namespace] = Node((), [], None, 0)
        return root

    def _descend(self, root: Node, key: tuple[int, ...]) -> tuple[Node, int]:
        """Follows whole-page `key` down from `root`, splitting the node the match ends inside,
        and touches the path. Returns the deepest matched node and the tokens matched."""
        ps, tick = self.page_size, next(self._clock)
        node, pos = root, 0
        root.last_access = tick
        while (child := node.children.get(key[pos : pos + ps])) is not None:
            n = len(child.key)
            if key[pos : pos + n] != child.key:
                n = ps  # the first page matches (it is the index); find the first mismatch
                while n < len(child.key) and child.key[n : n + ps] == key[pos + n : pos + n + ps]:
                    n += ps
                child = self._split(child, n)
            node, pos = child, pos + n
            node.last_access = tick
            if node.heap_index >= 0:
                self._heap.touched(node)
        return node, pos

    def _split(self, child: Node, n: int) -> Node:
        """Cuts `child` after n tokens; the new upper node is returned and `child` keeps its
        identity (and any heap slot, lock or pin) as the lower part."""
        ps = self.page_size
        top = Node(child.key[:n], child.pages[: n // ps], child.parent, child.last_access)
        top.lock_ref = child.lock_ref
        child.parent.children[child.key[:ps]] = top
        child.key, child.pages, child.parent = child.key[n:], child.pages[n // ps :], top
        top.children[child.key[:ps]] = child
        return top

    def _forget(self, node: Node) -> None:
        assert node.lock_ref == 0, node
        node.removed, node.heap_index = True, -1
        self._pages.difference_update(node.pages)
        self._num_evictable -= len(node.pages)


def _as_key(tokens: Tokens) -> tuple[int, ...]:
    return tuple(tokens.tolist()) if isinstance(tokens, np.ndarray) else tuple(tokens)


def _path_to_root(node: Node | None) -> Iterator[Node]:
    while node is not None:
        yield node
        node = node.parent
