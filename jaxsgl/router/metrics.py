"""The router's Prometheus metrics, read from the `WorkerSet` at scrape time.

Every figure lives once, in the worker records that `/list_workers` also shows, so the two views
always agree. A removed worker's series disappear with it (Prometheus treats that as a reset).

    jaxsgl_router_requests_total{worker,pool}       requests sent to the worker (retries too)
    jaxsgl_router_failures_total{worker,pool}       connection errors, cut streams, 5xx answers
    jaxsgl_router_in_flight{worker,pool}            requests being proxied to it now
    jaxsgl_router_worker_healthy{worker,pool}       1 healthy, 0 dead
    jaxsgl_router_retries_total{pool}               requests sent again to another worker
    jaxsgl_router_cache_aware_routed_total{pool,decision}  cache-aware choices: cache | balance
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxsgl.router.workers import WorkerSet

PREFIX = "jaxsgl_router_"


class _WorkerCollector(Collector):
    def __init__(self, workers: WorkerSet):
        self.workers = workers

    def collect(self) -> Iterator:
        labels = ["worker", "pool"]
        requests = CounterMetricFamily(
            PREFIX + "requests", "Requests sent to each worker", labels=labels
        )
        failures = CounterMetricFamily(
            PREFIX + "failures", "Failed requests (connection, cut stream, 5xx)", labels=labels
        )
        in_flight = GaugeMetricFamily(
            PREFIX + "in_flight", "Requests being proxied to each worker", labels=labels
        )
        healthy = GaugeMetricFamily(
            PREFIX + "worker_healthy", "Whether each worker takes traffic", labels=labels
        )
        for w in list(self.workers.workers.values()):
            key = [w.url, w.pool]
            requests.add_metric(key, w.requests_total)
            failures.add_metric(key, w.failures_total)
            in_flight.add_metric(key, w.in_flight)
            healthy.add_metric(key, 1.0 if w.healthy else 0.0)
        yield from (requests, failures, in_flight, healthy)
        yield from self._per_pool()

    def _per_pool(self) -> Iterator:
        retries = CounterMetricFamily(
            PREFIX + "retries", "Requests retried on another worker", labels=["pool"]
        )
        routed = CounterMetricFamily(
            PREFIX + "cache_aware_routed",
            "Cache-aware decisions: to the worker holding the prefix, or to the least loaded",
            labels=["pool", "decision"],
        )
        for pool, n in dict(self.workers.retries_total).items():
            retries.add_metric([pool], n)
            counts = self.workers.routed_counts(pool)
            if counts is not None:
                routed.add_metric([pool, "cache"], counts[0])
                routed.add_metric([pool, "balance"], counts[1])
        yield from (retries, routed)


class RouterMetrics:
    """A registry of its own holding the router's collector."""

    def __init__(self, workers: WorkerSet):
        self.registry = CollectorRegistry()
        self.registry.register(_WorkerCollector(workers))

    def render(self) -> bytes:
        return generate_latest(self.registry)
