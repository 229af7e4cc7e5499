"""Prometheus metrics under SGLang's names, so dashboards built for SGLang work unchanged.

Gauges and totals are read from the engine at scrape time (one snapshot, no double counting);
latency histograms are observed as requests finish. The deployment guide's three names
(`sglang_hit_rate`, `request_latency_seconds`, `active_gpu_memory_bytes`) sit beside the
`sglang:` family.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator

import jax
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)

_GAUGES = {  # engine snapshot key -> (metric name, help)
    "num_running_reqs": ("sglang:num_running_reqs", "Requests running (prefill or decode)"),
    "num_queue_reqs": ("sglang:num_queue_reqs", "Requests waiting in the queue"),
    "num_used_tokens": ("sglang:num_used_tokens", "KV slots held by running requests"),
    "token_usage": ("sglang:token_usage", "Share of the KV pool held by running requests"),
    "cache_hit_rate": ("sglang:cache_hit_rate", "Prompt tokens served from the prefix cache"),
    "num_grammar_waiting_reqs": (
        "sglang:num_grammar_queue_reqs",
        "Requests waiting for their grammar to compile",
    ),
}
_TOTALS = {
    "prompt_tokens_total": ("sglang:prompt_tokens", "Prompt tokens of finished requests"),
    "generation_tokens_total": ("sglang:generation_tokens", "Generated tokens"),
    "cached_tokens_total": ("sglang:cached_tokens", "Prompt tokens served from the cache"),
    "num_requests_total": ("sglang:num_requests", "Finished requests"),
    "num_aborted_total": ("sglang:num_aborted_requests", "Aborted requests"),
    "num_retractions_total": ("sglang:num_retractions", "Requests retracted for memory"),
    "grammar_compiled_total": ("sglang:grammar_compiled", "Grammars compiled"),
    "grammar_cache_hits_total": ("sglang:grammar_cache_hits", "Grammars served from the cache"),
    "grammar_compile_seconds_total": (
        "sglang:grammar_compile_seconds",
        "Seconds spent compiling grammars",
    ),
    "jump_forward_tokens_total": (
        "sglang:jump_forward_tokens",
        "Output tokens a grammar forced, appended without sampling",
    ),
    "mixed_decode_tokens_total": (
        "jaxsgl:mixed_decode_tokens",
        "Decode tokens computed inside prefill steps (--enable-mixed-chunk)",
    ),
    "extend_steps_total": ("jaxsgl:extend_steps", "Extend (prefill) steps run"),
    "extend_tokens_total": ("jaxsgl:extend_tokens", "Prompt tokens computed in extend steps"),
    "extend_seconds_total": (
        "jaxsgl:extend_seconds",
        "Engine seconds in extend steps, from scheduling to tokens sent",
    ),
    "decode_launches_total": ("jaxsgl:decode_launches", "Decode launches (of one or more steps)"),
    "decode_steps_total": ("jaxsgl:decode_steps", "Decode steps run"),
    "decode_seconds_total": (
        "jaxsgl:decode_seconds",
        "Engine seconds in decode launches, from scheduling to tokens sent",
    ),
    "step_compiles_total": (
        "jaxsgl:step_compiles",
        "Step programs compiled after warm-up (the engine waits for each)",
    ),
    "step_compile_seconds_total": (
        "jaxsgl:step_compile_seconds",
        "Seconds the engine spent compiling step programs after warm-up",
    ),
}


class _EngineCollector(Collector):
    def __init__(
        self,
        snapshot: Callable[[], dict],
        throughput: Callable[[], float],
        namespaces: Callable[[], dict[str, tuple[int, int]]],
    ):
        self.snapshot, self.throughput, self.namespaces = snapshot, throughput, namespaces

    def collect(self) -> Iterator:
        m = self.snapshot()
        for key, (name, doc) in _GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=m[key])
        for key, (name, doc) in _TOTALS.items():
            yield CounterMetricFamily(name, doc, value=m[key])
        yield GaugeMetricFamily(
            "sglang:gen_throughput", "Generated tokens per second, recent", value=self.throughput()
        )
        yield GaugeMetricFamily(
            "sglang_hit_rate", "Prefix cache hit rate (deployment guide)", value=m["cache_hit_rate"]
        )
        memory = GaugeMetricFamily(
            "active_gpu_memory_bytes",
            "Accelerator memory in use (process memory on the CPU)",
            labels=["device"],
        )
        for device, used in device_memory():
            memory.add_metric([device], used)
        yield memory
        yield from self._namespace_families()

    def _namespace_families(self) -> Iterator:
        """Prompt and cached tokens per cache namespace (the unnamed one is `default`)."""
        prompt = CounterMetricFamily(
            "sglang:namespace_prompt_tokens",
            "Prompt tokens of finished requests, per namespace",
            labels=["namespace"],
        )
        cached = CounterMetricFamily(
            "sglang:namespace_cached_tokens",
            "Prompt tokens served from the cache, per namespace",
            labels=["namespace"],
        )
        for namespace, (p, c) in sorted(self.namespaces().items()):
            prompt.add_metric([namespace or "default"], p)
            cached.add_metric([namespace or "default"], c)
        yield prompt
        yield cached


def device_memory() -> list[tuple[str, float]]:
    rows = []
    for d in jax.local_devices():
        stats = d.memory_stats() if d.platform != "cpu" else None
        if stats and "bytes_in_use" in stats:
            rows.append((f"{d.platform}:{d.id}", float(stats["bytes_in_use"])))
    return rows or [("cpu", float(_process_rss()))]


def _process_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Metrics:
    def __init__(
        self,
        snapshot: Callable[[], dict],
        throughput: Callable[[], float],
        namespaces: Callable[[], dict[str, tuple[int, int]]] = dict,
    ):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, throughput, namespaces))
        h = lambda name, doc, buckets: Histogram(name, doc, buckets=buckets, registry=self.registry)
        self.e2e = h(
            "sglang:e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS
        )
        self.latency = h(
            "request_latency_seconds", "Request latency (deployment guide)", LATENCY_BUCKETS
        )
        self.ttft = h("sglang:time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS)
        self.itl = h(
            "sglang:inter_token_latency_seconds",
            "Time between output tokens",
            TOKEN_LATENCY_BUCKETS,
        )

    def observe_finished(self, meta: dict) -> None:
        self.e2e.observe(meta["e2e_latency"])
        self.latency.observe(meta["e2e_latency"])
        if meta.get("ttft") is not None:
            self.ttft.observe(meta["ttft"])
            n = meta["completion_tokens"]
            if n > 1:
                self.itl.observe((meta["e2e_latency"] - meta["ttft"]) / (n - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
