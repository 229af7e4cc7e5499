"""The order in which waiting requests are considered for admission.

- fcfs: arrival order (retracted requests keep their original arrival time, so they go first).
- lpm: longest cached prefix first, which keeps hot prefixes locked and hit.
- dfs-weight: walk the radix tree depth first, heavier subtrees (more waiting requests below)
  first, so requests sharing a prefix run next to each other.

The cache-aware orders match every waiting request each step; the scheduler takes queues
longer than `scheduler.CACHE_AWARE_MAX_WAITING` in arrival order instead.
"""

from __future__ import annotations

from collections import defaultdict

from jaxsgl.engine.radix_cache import MatchResult, Node
from jaxsgl.engine.request import Request


def order_waiting(
    policy: str, waiting: list[Request], matches: dict[int, MatchResult]
) -> list[Request]:
    """`waiting` in admission order; `matches[id(req)]` is each request's cached prefix."""
    if policy == "fcfs":
        return sorted(waiting, key=lambda r: r.arrival_time)
    if policy == "lpm":
        return sorted(waiting, key=lambda r: (-matches[id(r)].num_tokens, r.arrival_time))
    if policy == "dfs-weight":
        return _dfs_weight(waiting, matches)
    raise ValueError(f"unknown schedule policy {policy!r}")


def _dfs_weight(waiting: list[Request], matches: dict[int, MatchResult]) -> list[Request]:
    at_node: dict[int, list[Request]] = defaultdict(list)
    children: dict[int, set[Node]] = defaultdict(set)
    weight: dict[int, int] = defaultdict(int)
    roots: dict[int, Node] = {}
    for req in sorted(waiting, key=lambda r: r.arrival_time):
        node = matches[id(req)].node
        at_node[id(node)].append(req)
        while True:  # count this request on every node up to its root
            weight[id(node)] += 1
            if node.parent is None:
                roots[id(node)] = node
                break
            children[id(node.parent)].add(node)
            node = node.parent
    order: list[Request] = []
    stack = sorted(roots.values(), key=lambda n: weight[id(n)])
    while stack:
        node = stack.pop()
        order += at_node[id(node)]
        # Push lighter children first so the heaviest is visited next.
        stack += sorted(children[id(node)], key=lambda n: (weight[id(n)], -n.last_access))
    return order
