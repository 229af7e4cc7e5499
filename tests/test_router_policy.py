"""The router's prefix tree against a brute-force model, and the three policies' choices."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsgl.router import CacheAware, PrefixTree, RoundRobin, ShortestQueue, make_policy

TEXTS = st.text(alphabet="abc ", min_size=0, max_size=12)
OPS = st.lists(st.tuples(TEXTS, st.integers(0, 2)), max_size=40)


def _common(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@settings(max_examples=200, deadline=None)
@given(OPS, st.lists(TEXTS, min_size=1, max_size=5))
def test_match_is_the_longest_prefix_each_worker_got(ops, queries):
    tree = PrefixTree(max_chars_per_worker=10**9)  # nothing forgotten
    got: dict[int, list[str]] = {}
    for text, w in ops:
        tree.insert(text, w)
        got.setdefault(w, []).append(text)
        tree.check_integrity()
    for q in queries:
        expected = {w: max(_common(q, t) for t in ts) for w, ts in got.items()}
        expected = {w: n for w, n in expected.items() if n > 0}
        assert tree.match(q) == expected


@settings(max_examples=200, deadline=None)
@given(OPS, st.integers(1, 20))
def test_each_worker_stays_within_its_bound_and_keeps_its_latest_text(ops, bound):
    tree = PrefixTree(max_chars_per_worker=bound)
    for text, w in ops:
        tree.insert(text, w)
        tree.check_integrity()
        if len(text) <= bound:  # the newest text is the last thing forgotten
            assert tree.match(text).get(w, 0) == len(text)
    for w, n in tree.num_chars.items():
        assert n <= bound or n == max(len(t) for t, v in ops if v == w)


@settings(max_examples=100, deadline=None)
@given(OPS, st.integers(0, 2))
def test_removed_worker_is_forgotten(ops, gone):
    tree = PrefixTree()
    for text, w in ops:
        tree.insert(text, w)
    tree.remove_worker(gone)
    tree.check_integrity()
    for text, _ in ops:
        assert gone not in tree.match(text)


def test_cache_aware_follows_the_prefix_then_balances():
    policy = CacheAware(cache_threshold=0.5, balance_abs=4, balance_rel=2.0)
    system = "You are a careful assistant. Answer briefly. "
    loads = {"a": 0, "b": 0}
    first = policy.choose(system + "Q1", loads)
    assert first == "a"  # nothing cached: least loaded, first listed
    loads["a"] = 3  # busier, but not badly unbalanced: the prefix wins
    assert policy.choose(system + "Q2", loads) == "a"
    assert policy.choose("Something else entirely, no shared text", loads) == "b"
    loads["a"] = 9  # 9 - 0 > 4 and 9 > 2 * 0: unbalanced, the cache is ignored
    assert policy.choose(system + "Q3", loads) == "b"
    assert policy.num_cache_routed == 1 and policy.num_balance_routed == 3
    # A match covering under the threshold does not count.
    loads = {"a": 0, "b": 0}
    assert policy.choose("You " + "x" * 40, loads) == "a"


def test_round_robin_and_shortest_queue():
    rr = RoundRobin()
    loads = {"a": 5, "b": 0, "c": 0}
    assert [rr.choose("t", loads) for _ in range(4)] == ["a", "b", "c", "a"]
    assert ShortestQueue().choose("t", loads) == "b"
    assert make_policy("shortest_queue").name == "shortest_queue"


def test_bad_policy_and_empty_pool_are_value_errors():
    import pytest

    with pytest.raises(ValueError, match="policy 'fastest'"):
        make_policy("fastest")
    for policy in (CacheAware(), RoundRobin(), ShortestQueue()):
        with pytest.raises(ValueError, match="no worker"):
            policy.choose("text", {})


def test_cache_aware_spreads_new_prefixes_over_idle_workers():
    policy = CacheAware()
    loads = {"a": 0, "b": 0, "c": 0}
    first = [policy.choose(f"group {g}: " + "x" * 50, loads) for g in "PQR"]
    assert sorted(first) == ["a", "b", "c"]  # each new prefix to an idle worker holding least
    again = [policy.choose(f"group {g}: " + "x" * 50 + " q2", loads) for g in "PQR"]
    assert again == first  # and each group then stays where its prefix is
