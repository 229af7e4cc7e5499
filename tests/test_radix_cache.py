"""RadixCache: worked examples, a stateful test against a naive model, and eviction cost."""

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxsgl.engine.page_allocator import PageAllocator
from jaxsgl.engine.radix_cache import Node, RadixCache

# A three-token alphabet and two namespaces, so prefixes collide across requests.
NAMESPACES = st.sampled_from(["", "finance"])
TOKENS = st.lists(st.integers(0, 2), max_size=12)
SEQUENCES = st.tuples(NAMESPACES, TOKENS)


def cache_with(page_size, *entries, namespace=""):
    """A cache holding each (tokens, pages) entry, inserted in order."""
    cache = RadixCache(page_size)
    for tokens, pages in entries:
        cache.insert(tokens, pages, namespace)
    return cache


def test_partial_match_splits_the_node_at_the_page_boundary():
    cache = cache_with(2, ([1, 2, 3, 4, 5, 6], [7, 3, 9]))
    lower = cache.match_prefix([1, 2, 3, 4, 5, 6]).node
    m = cache.match_prefix([1, 2, 3, 4, 8, 8, 0])
    assert (m.pages, m.num_tokens) == ([7, 3], 4)
    assert m.node.key == (1, 2, 3, 4) and m.node.pages == [7, 3]
    # The old node keeps its identity as the lower half, so a lock held on it stays valid.
    assert lower.key == (5, 6) and lower.pages == [9] and lower.parent is m.node
    cache.check_integrity()


def test_match_stops_at_the_last_whole_page():
    cache = cache_with(4, ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2]))
    assert cache.match_prefix([1, 2, 3, 4, 5, 6, 7]).pages == [1]
    assert cache.match_prefix([1, 2, 3]).pages == []
    assert cache.match_prefix(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9])).pages == [1, 2]
    assert cache.match_prefix([1, 2, 3, 5]).node is cache.match_prefix([]).node  # the root


def test_insert_returns_the_already_cached_length():
    cache = cache_with(2, ([1, 2, 3, 4], [7, 3]))
    # A request that matched nothing computed [1 2 3 4 5 6] into pages [4 5 6]: the tree keeps
    # 7 and 3, adopts 6, and the caller frees its duplicates 4 and 5.
    assert cache.insert([1, 2, 3, 4, 5, 6, 0], [4, 5, 6]) == 4
    assert sorted(cache.all_pages()) == [3, 6, 7]
    assert cache.insert([1, 2, 3, 4], [7, 3]) == 4  # the caller's pages are the tree's own
    assert cache.insert([1, 2, 9, 9], [7, 8]) == 2  # diverges inside a node: split, adopt 8
    assert cache.match_prefix([1, 2, 9, 9]).pages == [7, 8]
    assert cache.insert([5], []) == 0
    assert cache.num_cached_pages == 4
    cache.check_integrity()


def test_insert_rejects_bad_pages():
    cache = cache_with(2, ([1, 2], [7]))
    with pytest.raises(ValueError, match="got 1 pages for 4 tokens"):
        cache.insert([1, 2, 3, 4], [7])
    with pytest.raises(ValueError, match="already cached"):
        cache.insert([3, 4], [7])
    with pytest.raises(ValueError, match="repeat"):
        cache.insert([3, 4, 5, 6], [8, 8])
    cache.check_integrity()


def test_namespaces_share_no_node_and_no_page():
    cache = cache_with(2, ([1, 2, 3, 4], [1, 2]))
    assert cache.match_prefix([1, 2, 3, 4], namespace="finance").pages == []
    assert cache.insert([1, 2, 3, 4], [3, 4], namespace="finance") == 0
    default, finance = cache.match_prefix([1, 2, 3, 4]), cache.match_prefix([1, 2, 3, 4], "finance")
    assert (default.pages, finance.pages) == ([1, 2], [3, 4])
    assert default.node is not finance.node and default.node.parent is not finance.node.parent
    cache.lock(finance.node)
    assert sorted(cache.evict(10)) == [1, 2]
    assert cache.match_prefix([1, 2, 3, 4], "finance").pages == [3, 4]
    cache.check_integrity()


def test_lock_protects_the_node_and_its_ancestors():
    cache = cache_with(1, ([1, 2, 3], [1, 2, 3]), ([1, 2, 4], [1, 2, 4]))
    node = cache.match_prefix([1, 2, 3]).node
    cache.lock(node)
    assert cache.num_evictable_pages == 1 and cache.num_locked_pages == 3
    assert cache.evict(10) == [4]  # only the sibling; [1 2] is above the lock
    cache.check_integrity()
    cache.unlock(node)
    assert cache.num_evictable_pages == 3
    assert sorted(cache.evict(10)) == [1, 2, 3]
    with pytest.raises(AssertionError, match="unlock of unlocked"):
        cache.unlock(node)
    with pytest.raises(ValueError, match="evicted"):
        cache.lock(node)


def test_lru_evicts_older_leaves_first_and_parents_after_children():
    cache = cache_with(1, ([1, 2], [1, 2]), ([1, 3], [1, 3]), ([4], [4]), ([5], [5]))
    cache.match_prefix([4])  # now [1 2] is the oldest leaf, then [1 3], [5], [4]
    assert cache.evict(1) == [2]
    assert cache.evict(1) == [3]
    assert cache.evict(1) == [1]  # its children gone, [1] is a leaf older than [5]
    assert cache.evict(2) == [5, 4]
    assert cache.evict(1) == [] and cache.num_cached_pages == 0
    cache.check_integrity()


def test_evict_releases_whole_nodes():
    cache = cache_with(2, ([1, 2, 3, 4, 5, 6], [1, 2, 3]))
    assert cache.evict(1) == [1, 2, 3]


def test_a_split_keeps_locks_and_heap_slots_consistent():
    cache = cache_with(1, ([1, 2, 3, 4], [1, 2, 3, 4]), ([9], [9]))
    node = cache.match_prefix([1, 2, 3, 4]).node
    cache.lock(node)
    cache.match_prefix([1, 2, 7])  # splits the locked node
    cache.match_prefix([9, 9])  # touches a leaf in the heap
    cache.check_integrity()
    cache.unlock(node)
    cache.check_integrity()
    assert cache.evict(4) == [3, 4, 1, 2]  # older than [9]; [1 2] is a leaf once [3 4] goes


def test_pin_survives_evict_and_flush_until_unpinned():
    system = [1, 2, 3, 4]
    cache = cache_with(2, (system, [1, 2]), ([5, 6], [3]))
    assert cache.pin(system + [9]) == 4
    assert cache.pin(system) == 4  # pins nest
    assert cache.evict(10) == [3] and cache.flush() == []
    assert cache.num_evictable_pages == 0
    cache.unpin(system + [7, 7])
    assert cache.flush() == [] and cache.match_prefix(system).pages == [1, 2]
    cache.unpin(system)
    assert cache.num_evictable_pages == 2
    assert sorted(cache.evict(1)) == [1, 2]
    with pytest.raises(ValueError, match="no pinned prefix"):
        cache.unpin(system)
    cache.check_integrity()


def test_num_pinned_pages_counts_each_pinned_path_once():
    cache = cache_with(2, ([1, 2, 3, 4, 5, 6], [1, 2, 3]), ([1, 2, 7, 8], [1, 4]), ([9, 9], [5]))
    assert cache.num_pinned_pages == 0
    cache.pin([1, 2, 3, 4, 5, 6])
    cache.pin([1, 2, 7, 8])  # shares page 1 with the first pin
    cache.pin([1, 2, 3, 4])  # nested inside the first: splits, adds nothing
    assert cache.num_pinned_pages == 4  # pages 1, 2, 3 and 4; never 5
    cache.unpin([1, 2, 3, 4, 5, 6])  # the deepest pin on that path
    assert cache.num_pinned_pages == 3  # [1 2 3 4] and [1 2 7 8] still pinned: pages 1, 2, 4
    cache.unpin([1, 2, 3, 4])
    cache.unpin([1, 2, 7, 8])
    assert cache.num_pinned_pages == 0
    cache.check_integrity()


def test_unpin_releases_the_deepest_pin_first():
    cache = cache_with(1, ([1, 2], [1, 2]))
    assert cache.pin([1, 2, 3]) == 2
    assert cache.pin([3]) == 0  # nothing cached: pins the root, still needs an unpin
    cache.match_prefix([1, 2])
    cache.pin([1])  # splits; this pin sits on [1]
    cache.unpin([1, 2])  # releases the pin on [1 2]
    assert cache.evict(5) == [2]
    cache.unpin([1, 2])
    cache.unpin([3])
    assert cache.evict(5) == [1]
    cache.check_integrity()


def test_disabled_cache_caches_nothing_and_takes_no_page():
    cache = RadixCache(2, disable=True)
    assert cache.insert([1, 2, 3, 4, 5], [1, 2]) == 4  # "all cached": the caller frees 1 and 2
    m = cache.match_prefix([1, 2, 3, 4])
    assert (m.pages, m.num_tokens) == ([], 0)
    cache.lock(m.node)
    cache.unlock(m.node)
    assert cache.pin([1, 2]) == 0
    cache.unpin([1, 2])
    assert cache.evict(3) == [] and cache.flush() == [] and cache.all_pages() == []
    cache.check_integrity()


def test_bad_arguments():
    with pytest.raises(ValueError, match="page_size must be >= 1, got 0"):
        RadixCache(0)
    with pytest.raises(ValueError, match="-1"):
        RadixCache(1).evict(-1)
    with pytest.raises(ValueError, match="namespace must be a str"):
        RadixCache(1).match_prefix([1], namespace=None)


def two_level_cache(num_leaves):
    """page_size 1; root -> 100 nodes [g] -> num_leaves / 100 leaves [g, b], leaf i has page i."""
    cache, group_page = RadixCache(1), num_leaves
    for i in range(num_leaves):
        cache.insert([i // 100, i % 100], [group_page + i // 100, i])
    return cache


def test_eviction_work_is_k_log_n_not_n():
    n, k = 10_000, 32
    cache = two_level_cache(n)
    bound = 4 * k * math.log2(n)  # ~1.7k heap steps; a scan would be >= 10k
    steps = cache.num_heap_steps
    assert cache.evict(k) == list(range(k))  # inserted in that order: least recent first
    assert cache.num_heap_steps - steps <= bound
    # Touch every remaining leaf, newest first, so [0 k] becomes the least recently used.
    # Lazy invalidation would now pop ~n stale entries; an indexed heap pays O(log n) per touch.
    steps = cache.num_heap_steps
    for i in reversed(range(k, n)):
        cache.match_prefix([i // 100, i % 100])
    assert cache.num_heap_steps - steps <= 2 * n * math.log2(n)
    steps = cache.num_heap_steps
    assert cache.evict(k) == list(range(n - 1, n - 1 - k, -1))
    assert cache.num_heap_steps - steps <= bound
    cache.check_integrity()


class Reference:
    """The naive model: per namespace, every cached page-aligned prefix -> its page, the last
    tick it was used, and lock counts (pins included) per locked prefix."""

    def __init__(self, page_size, disable):
        self.page_size, self.disable, self.tick = page_size, disable, 0
        self.page = {}  # (namespace, prefix tuple) -> page id
        self.time = {}  # (namespace, prefix tuple) -> tick of last use
        self.locks = Counter()  # (namespace, prefix tuple) -> lock count
        self.pins = []  # (namespace, prefix tuple), one per pin

    def prefixes(self, namespace, tokens):
        ps = self.page_size
        return [(namespace, tuple(tokens[: j * ps])) for j in range(1, len(tokens) // ps + 1)]

    def match(self, namespace, tokens):
        pages = []
        for key in self.prefixes(namespace, tokens):
            if key not in self.page:
                break
            pages.append(self.page[key])
        return pages

    def touch(self, namespace, tokens, num_tokens):
        self.tick += 1
        for key in self.prefixes(namespace, tokens[:num_tokens]):
            self.time[key] = self.tick

    def protected(self, key):
        (ns, prefix), n = key, len(key[1])
        return any(ns == ns2 and p[:n] == prefix for (ns2, p), c in self.locks.items() if c)

    def is_leaf(self, key):
        (ns, prefix), n = key, len(key[1]) + self.page_size
        return not any(
            ns == ns2 and len(p) == n and p[: len(prefix)] == prefix for ns2, p in self.page
        )

    def unprotected(self):
        return [key for key in self.page if not self.protected(key)]

    def drop(self, keys):
        for key in keys:
            del self.page[key], self.time[key]


@dataclass
class Request:
    namespace: str
    tokens: list
    node: Node  # locked while the request runs
    matched: int  # tokens matched when it started
    pages: list  # one per whole page: the tree's for the match, then `owned`
    owned: list  # pages it allocated and holds


class RadixCacheMachine(RuleBasedStateMachine):
    """Drives the cache as the scheduler would, with pages from a real PageAllocator."""

    @initialize(
        page_size=st.sampled_from([2, 1, 3]),
        num_pages=st.integers(8, 40),
        disable=st.sampled_from([False, False, False, True]),
    )
    def setup(self, page_size, num_pages, disable):
        self.ps = page_size
        self.cache = RadixCache(page_size, disable=disable)
        self.alloc = PageAllocator(num_pages)
        self.ref = Reference(page_size, disable)
        self.requests, self.pinned, self.history = [], [], []

    def match_and_check(self, namespace, tokens):
        m = self.cache.match_prefix(tokens, namespace)
        expected = [] if self.ref.disable else self.ref.match(namespace, tokens)
        assert m.pages == expected and m.num_tokens == len(expected) * self.ps
        self.ref.touch(namespace, tokens, m.num_tokens)
        return m

    def evict_and_check(self, num_pages):
        evictable = self.cache.num_evictable_pages
        released = self.cache.evict(num_pages)
        assert len(released) >= num_pages if evictable >= num_pages else len(released) == evictable
        gone = [key for key, page in self.ref.page.items() if page in set(released)]
        assert len(gone) == len(released) == len(set(released))
        assert not any(self.ref.protected(key) for key in gone)
        last_use = max((self.ref.time[k] for k in gone), default=0)
        self.ref.drop(gone)
        # LRU: everything evicted was used no later than any evictable leaf left.
        leaves = [k for k in self.ref.unprotected() if self.ref.is_leaf(k)]
        assert all(last_use <= self.ref.time[k] for k in leaves)
        self.alloc.free(released)

    # Hypothesis favours rules with fewer arguments, so each rule takes one (a tuple where it
    # needs more) and the argument-free flush waits for a cache worth flushing; otherwise
    # flushes would keep the tree nearly empty.
    @precondition(lambda self: len(self.requests) < 4)
    @rule(seq=SEQUENCES)
    def begin_request(self, seq):
        self.start(*seq)

    @precondition(lambda self: len(self.requests) < 4 and self.history)
    @rule(turn=st.tuples(st.integers(0, 7), st.lists(st.integers(0, 2), max_size=4)))
    def begin_next_turn(self, turn):
        """A later turn of a conversation: an earlier sequence plus new tokens."""
        index, suffix = turn
        namespace, tokens = self.history[index % len(self.history)]
        self.start(namespace, tokens + suffix)

    @rule(seq=SEQUENCES)
    def complete_request(self, seq):
        """A request that starts and finishes between two other steps."""
        if self.start(*seq):
            self.finish(len(self.requests) - 1, "insert")

    def start(self, namespace, tokens):
        m = self.match_and_check(namespace, tokens)
        self.cache.lock(m.node)
        self.ref.locks[namespace, tuple(tokens[: m.num_tokens])] += 1
        need = len(tokens) // self.ps - len(m.pages)
        if self.alloc.num_free < need:
            self.evict_and_check(need - self.alloc.num_free)
        owned = self.alloc.alloc(need)
        if owned is None:  # out of memory even after eviction: the request waits
            self.cache.unlock(m.node)
            self.ref.locks[namespace, tuple(tokens[: m.num_tokens])] -= 1
            return False
        self.requests.append(
            Request(namespace, tokens, m.node, m.num_tokens, m.pages + owned, owned)
        )
        return True

    @precondition(lambda self: self.requests)
    @rule(how=st.tuples(st.integers(0, 3), st.sampled_from(["insert", "abort"])))
    def finish_request(self, how):
        index, outcome = how
        self.finish(index % len(self.requests), outcome)

    def finish(self, index, outcome):
        req = self.requests.pop(index)
        if outcome == "insert":  # as the engine does: cache the sequence, free duplicate pages
            ns, tokens, ps = req.namespace, req.tokens, self.ps
            expected = len(tokens) // ps if self.ref.disable else len(self.ref.match(ns, tokens))
            already = self.cache.insert(tokens, req.pages, ns)
            assert already == expected * ps and already >= req.matched
            self.alloc.free(req.pages[req.matched // ps : already // ps])
            if not self.ref.disable:
                self.ref.touch(ns, tokens, len(tokens))
                for key, page in zip(self.ref.prefixes(ns, tokens), req.pages, strict=True):
                    self.ref.page.setdefault(key, page)
            self.history.append((ns, tokens))
        else:
            self.alloc.free(req.owned)
        self.cache.unlock(req.node)
        self.ref.locks[req.namespace, tuple(req.tokens[: req.matched])] -= 1

    @rule(seq=SEQUENCES)
    def match(self, seq):
        self.match_and_check(*seq)

    @rule(num_pages=st.integers(0, 12))
    def evict(self, num_pages):
        self.evict_and_check(num_pages)

    @precondition(lambda self: len(self.pinned) < 3 and self.history)
    @rule(pick=st.tuples(st.integers(0, 7), st.integers(0, 12)))
    def pin(self, pick):
        """Warm-up pins a prefix of something served before (a system prompt)."""
        index, length = pick
        namespace, tokens = self.history[index % len(self.history)]
        tokens = tokens[:length]
        expected = [] if self.ref.disable else self.ref.match(namespace, tokens)
        num_tokens = self.cache.pin(tokens, namespace)
        assert num_tokens == len(expected) * self.ps
        self.ref.touch(namespace, tokens, num_tokens)
        self.ref.locks[namespace, tuple(tokens[:num_tokens])] += 1
        self.ref.pins.append((namespace, tuple(tokens[:num_tokens])))
        self.pinned.append((namespace, tokens))

    @precondition(lambda self: self.pinned)
    @rule(index=st.integers(0, 2))
    def unpin(self, index):
        namespace, tokens = self.pinned.pop(index % len(self.pinned))
        self.cache.unpin(tokens, namespace)
        # The deepest pin on the path goes, which may be one made with other tokens.
        mine = [p for p in self.ref.pins if p[0] == namespace and tokens[: len(p[1])] == list(p[1])]
        deepest = max(mine, key=lambda p: len(p[1]))
        self.ref.pins.remove(deepest)
        self.ref.locks[deepest] -= 1

    @precondition(lambda self: self.cache.num_cached_pages >= 4)
    @rule()
    def flush(self):
        released = self.cache.flush()
        gone = self.ref.unprotected()
        assert sorted(released) == sorted(self.ref.page[key] for key in gone)
        self.ref.drop(gone)
        self.alloc.free(released)

    @invariant()
    def pages_are_accounted_for(self):
        if not hasattr(self, "cache"):
            return
        self.cache.check_integrity()
        self.alloc.check_integrity()
        cached, held = self.cache.all_pages(), [p for r in self.requests for p in r.owned]
        everything = self.alloc.free_pages() + cached + held
        assert sorted(everything) == list(range(1, self.alloc.num_total + 1))
        assert sorted(cached) == sorted(self.ref.page.values())
        assert self.cache.num_evictable_pages == len(self.ref.unprotected())
        for r in self.requests:  # a lock keeps the matched prefix's pages in place
            assert (
                self.ref.match(r.namespace, r.tokens)[: r.matched // self.ps]
                == r.pages[: r.matched // self.ps]
            )


RadixCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_radix_cache_matches_reference = RadixCacheMachine.TestCase
