"""The router's workers: which exist, which pool each serves, which are healthy, how busy.

`WorkerSet` owns this state; everything runs on the router's one event loop, so counters need no
locks. A worker is *dead* after `failure_threshold` failed health checks in a row, or at once
after a connection error while proxying; a dead worker gets no new requests and is probed by the
periodic check until it answers `GET /health` with 200 again. Each pool has its own policy
instance, so cache-aware state and round-robin turns stay within the pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable

import aiohttp

from jaxsgl.router.policy import CacheAware, Policy, make_policy

logger = logging.getLogger(__name__)


class NoWorkerError(Exception):
    """No healthy worker can take the request (the router answers 503)."""


@dataclasses.dataclass(eq=False)
class Worker:
    url: str
    pool: str
    healthy: bool = False  # unknown until the first check answers
    in_flight: int = 0
    requests_total: int = 0  # requests sent here, including those that failed
    failures_total: int = 0  # connection errors, cut streams, 5xx answers
    failed_checks: int = 0  # consecutive failed health checks

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def normalize_url(url: object) -> str:
    """`url` without a trailing slash; ValueError unless it is an http(s) URL."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"worker url must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


class WorkerSet:
    """The workers by URL, grouped in pools, each pool routed by its own `policy_name` policy."""

    def __init__(self, policy_name: str, failure_threshold: int = 1):
        make_policy(policy_name)  # fail early on an unknown name
        self.policy_name = policy_name
        self.failure_threshold = failure_threshold
        self.workers: dict[str, Worker] = {}
        self.policies: dict[str, Policy] = {}
        self.retries_total: dict[str, int] = {}  # by pool

    def add(self, url: str, pool: str) -> Worker:
        url = normalize_url(url)
        if not isinstance(pool, str) or not pool:
            raise ValueError(f"pool must be a non-empty string, got {pool!r}")
        if url in self.workers:
            raise ValueError(f"worker {url} is already registered (pool {self.workers[url].pool})")
        worker = self.workers[url] = Worker(url, pool)
        if pool not in self.policies:
            self.policies[pool] = make_policy(self.policy_name)
            self.retries_total[pool] = 0
        logger.info("added worker %s to pool %s", url, pool)
        return worker

    def remove(self, url: str) -> Worker:
        worker = self.workers.pop(normalize_url(url), None)
        if worker is None:
            raise KeyError(url)
        self.policies[worker.pool].remove_worker(worker.url)
        logger.info("removed worker %s from pool %s", worker.url, worker.pool)
        return worker

    def pools(self) -> dict[str, list[Worker]]:
        pools: dict[str, list[Worker]] = {}
        for w in self.workers.values():
            pools.setdefault(w.pool, []).append(w)
        return pools

    def healthy(self, pool: str | None = None) -> list[Worker]:
        return [w for w in self.workers.values() if w.healthy and (pool is None or w.pool == pool)]

    def pick(self, pool: str, text: str, exclude: Iterable[Worker] = ()) -> Worker:
        """The worker of `pool` the policy chooses for `text`, among healthy ones not excluded."""
        skip = set(exclude)
        loads = {w.url: w.in_flight for w in self.healthy(pool) if w not in skip}
        if not loads:
            members = sum(w.pool == pool for w in self.workers.values())
            if not members:
                raise NoWorkerError(f"pool {pool!r} has no workers")
            raise NoWorkerError(f"no healthy worker left in pool {pool!r} ({members} registered)")
        return self.workers[self.policies[pool].choose(text, loads)]

    def routed_counts(self, pool: str) -> tuple[int, int] | None:
        """(cache, balance) decisions of a cache-aware pool; None for other policies."""
        policy = self.policies.get(pool)
        if not isinstance(policy, CacheAware):
            return None
        return policy.num_cache_routed, policy.num_balance_routed

    def mark_dead(self, worker: Worker, reason: str) -> None:
        if not worker.healthy:
            return
        logger.warning("worker %s is dead: %s", worker.url, reason)
        worker.healthy = False
        if self.workers.get(worker.url) is worker:  # its cache is gone or cold when it returns
            self.policies[worker.pool].remove_worker(worker.url)

    def record_check(self, worker: Worker, ok: bool, reason: str = "") -> None:
        if ok:
            if not worker.healthy:
                logger.info("worker %s is healthy", worker.url)
            worker.healthy, worker.failed_checks = True, 0
            return
        worker.failed_checks += 1
        if worker.failed_checks >= self.failure_threshold:
            self.mark_dead(worker, reason)


async def check_worker(session: aiohttp.ClientSession, worker: Worker, timeout: float) -> str:
    """One `GET /health`: "" when it answers 200, else what went wrong."""
    try:
        async with session.get(
            worker.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            return "" if r.status == 200 else f"/health answered {r.status}"
    except (aiohttp.ClientError, TimeoutError, OSError) as e:
        return f"/health failed: {type(e).__name__}: {e}"


async def check_all(workers: WorkerSet, session: aiohttp.ClientSession, timeout: float) -> None:
    """Probe every worker at once and record the results."""
    members = list(workers.workers.values())
    reasons = await asyncio.gather(*(check_worker(session, w, timeout) for w in members))
    for worker, reason in zip(members, reasons, strict=True):
        workers.record_check(worker, not reason, reason)


async def health_loop(
    workers: WorkerSet, session: aiohttp.ClientSession, interval: float, timeout: float
) -> None:
    """Check every worker each `interval` seconds, forever (cancelled at shutdown)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await check_all(workers, session, timeout)
        except Exception:  # a bug must not end health checking
            logger.exception("health check round failed")
