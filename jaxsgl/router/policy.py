"""Which replica gets a request: cache-aware, round-robin or shortest-queue.

A policy sees the request's text and each worker's load (requests in flight) and names a worker.
`CacheAware` sends a request where its prefix probably sits in cache (the `PrefixTree` of
texts each worker got) when that prefix covers at least `cache_threshold` of the request, else
to the least loaded worker; when loads are badly unbalanced (the busiest worker has more than
`balance_abs` requests beyond the idlest and over `balance_rel` times as many) it sends to the
least loaded whatever the cache says. Ties go to the least loaded; a request sent by load goes
to the least loaded worker holding the least remembered text, so new prefixes spread out.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Hashable, Mapping

from jaxsgl.router.prefix_tree import PrefixTree

Worker = Hashable


class Policy:
    name = ""

    def choose(self, text: str, loads: Mapping[Worker, int]) -> Worker:
        """The worker for a request of `text`, among the keys of `loads` (in flight each)."""
        raise NotImplementedError

    def remove_worker(self, worker: Worker) -> None:
        """`worker` left the pool."""


def least_loaded(
    loads: Mapping[Worker, int], then: Callable[[Worker], int] | None = None
) -> Worker:
    """The worker with the least load; among equals the least `then(worker)`, then the first
    listed."""
    if not loads:
        raise ValueError("no worker to route to")
    return min(loads, key=lambda w: (loads[w], then(w) if then else 0))


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self):
        self._next = itertools.count()
        self._lock = threading.Lock()

    def choose(self, text: str, loads: Mapping[Worker, int]) -> Worker:
        if not loads:
            raise ValueError("no worker to route to")
        with self._lock:
            i = next(self._next)
        return list(loads)[i % len(loads)]


class ShortestQueue(Policy):
    name = "shortest_queue"

    def choose(self, text: str, loads: Mapping[Worker, int]) -> Worker:
        return least_loaded(loads)


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(
        self,
        cache_threshold: float = 0.5,
        balance_abs: int = 32,
        balance_rel: float = 1.5,
        max_chars_per_worker: int = 1 << 22,
    ):
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.tree = PrefixTree(max_chars_per_worker)
        self._lock = threading.Lock()  # HTTP handlers route from several threads
        self.num_cache_routed = 0  # requests sent where their prefix was
        self.num_balance_routed = 0  # requests sent to the least loaded

    def unbalanced(self, loads: Mapping[Worker, int]) -> bool:
        hi, lo = max(loads.values()), min(loads.values())
        return hi - lo > self.balance_abs and hi > self.balance_rel * lo

    def choose(self, text: str, loads: Mapping[Worker, int]) -> Worker:
        if not loads:
            raise ValueError("no worker to route to")
        with self._lock:
            worker = self._pick(text, loads)
            self.tree.insert(text, worker)
        return worker

    def _pick(self, text: str, loads: Mapping[Worker, int]) -> Worker:
        if not self.unbalanced(loads):
            matched = {w: n for w, n in self.tree.match(text).items() if w in loads}
            if matched:
                best = max(matched.values())
                if best >= self.cache_threshold * len(text):
                    self.num_cache_routed += 1
                    return least_loaded({w: loads[w] for w in loads if matched.get(w) == best})
        self.num_balance_routed += 1
        # Among the least loaded, the one remembered to hold the least text: new prefixes
        # spread over the replicas' caches instead of piling onto the first listed.
        return least_loaded(loads, then=lambda w: self.tree.num_chars.get(w, 0))

    def remove_worker(self, worker: Worker) -> None:
        with self._lock:
            self.tree.remove_worker(worker)


POLICIES = {p.name: p for p in (CacheAware, RoundRobin, ShortestQueue)}


def make_policy(name: str, **kwargs) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"policy {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
