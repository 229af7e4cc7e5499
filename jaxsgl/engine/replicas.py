"""Data parallelism in one process: `dp_size` engines, each on its own group of `tp_size`
devices, behind one dispatcher.

Each request goes to one replica, chosen by the router's policies (`jaxsgl.router.policy`):
`cache_aware` keeps requests that share a prefix on the replica that probably caches it, so
each replica's radix cache serves its own part of the traffic instead of all of them holding
the same prefixes. The policy's key is the request's namespace and token ids (one character
per id), its load the requests a replica holds.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax

from jaxsgl.engine.engine import Engine
from jaxsgl.engine.options import EngineOptions
from jaxsgl.engine.request import Request
from jaxsgl.router.policy import make_policy

# Counters that add up over replicas; the rest of `Engine.metrics` is recomputed from sums.
_RATIOS = ("token_usage", "cache_hit_rate")


class Replicas:
    def __init__(self, options: EngineOptions, progress: bool = True):
        tp, dp = options.tp_size, options.dp_size
        devices = jax.devices()
        if tp * dp > len(devices):
            raise ValueError(
                f"dp_size={dp} x tp_size={tp} needs {tp * dp} devices, "
                f"but only {len(devices)} are visible"
            )
        groups = [devices[i * tp : (i + 1) * tp] for i in range(dp)] if dp > 1 else [None]
        if len(groups) == 1:
            self.engines = [Engine(options, progress, devices=groups[0])]
        else:
            # Each replica's programs are its own devices', but on GPUs the persistent
            # compilation cache keys a program without its devices: the first replica
            # compiles every step shape with all the cores, and the others, built after it
            # side by side, load those programs from the cache instead of compiling them.
            first = Engine(options, progress, devices=groups[0], compile_threads=os.cpu_count())
            with ThreadPoolExecutor(max_workers=len(groups) - 1) as pool:
                rest = pool.map(lambda g: Engine(options, progress, devices=g), groups[1:])
                self.engines = [first, *rest]
        self.policy = make_policy(options.load_balance_method)
        self._loads = [0] * len(self.engines)  # requests submitted and not yet finished
        self._lock = threading.Lock()
        self.num_routed = [0] * len(self.engines)

    def submit(self, req: Request) -> int:
        """Send `req` to a replica (its `on_event` already set); returns the replica's index."""
        if len(self.engines) == 1:
            self.engines[0].submit(req)
            return 0
        key = req.namespace + "\0" + "".join(map(chr, req.prompt_ids))
        with self._lock:
            i = self.policy.choose(key, dict(enumerate(self._loads)))
            self._loads[i] += 1
            self.num_routed[i] += 1
        req.on_event = self._counting(i, req.on_event)
        self.engines[i].submit(req)
        return i

    def _counting(self, i: int, on_event: Callable[[dict], None]) -> Callable[[dict], None]:
        def on_event_and_count(ev: dict) -> None:
            if ev["finished"]:
                with self._lock:
                    self._loads[i] -= 1
            on_event(ev)

        return on_event_and_count

    def abort(self, rid: str) -> None:
        for engine in self.engines:  # engines ignore ids they do not hold
            engine.abort(rid)

    def abort_all(self) -> None:
        for engine in self.engines:
            engine.abort_all()

    @property
    def has_work(self) -> bool:
        return any(e.scheduler.has_work for e in self.engines)

    @property
    def alive(self) -> bool:
        return all(e.alive for e in self.engines)

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()

    def metrics(self) -> dict[str, float]:
        """Every engine's counters added up; usage and hit rate over the sums."""
        each = [e.metrics() for e in self.engines]
        total = {k: sum(m[k] for m in each) for k in each[0] if k not in _RATIOS}
        capacity = sum(e.scheduler.kv.num_usable_pages * e.options.page_size for e in self.engines)
        total["token_usage"] = total["num_used_tokens"] / capacity
        prompt = total["prompt_tokens_total"]
        total["cache_hit_rate"] = total["cached_tokens_total"] / prompt if prompt else 0.0
        return total

    def gen_throughput(self, window: float = 10.0) -> float:
        return sum(e.stats.gen_throughput(window) for e in self.engines)
