"""Data-parallel replicas in one process (fake CPU devices): `dp_size` engines on disjoint
device groups behind one dispatcher. Outputs equal one replica's; cache-aware routing keeps a
shared prefix on one replica, so its hit rate beats round-robin's on grouped prompts."""

from __future__ import annotations

import random
import time

import jax
import pytest
from tiny_models import make_tiny

from jaxsgl.generator import Generator

GREEDY = {"temperature": 0.0, "max_new_tokens": 12}
COMMON = dict(dtype="float32", max_total_tokens=4096, context_length=512, warmup=False)


@pytest.fixture(scope="module")
def replicas():
    with Generator(dp_size=2, tp_size=2, progress=False, **COMMON) as g:
        yield g


def test_replicas_own_disjoint_devices(replicas):
    groups = [set(e.loaded.mesh.devices.flat) for e in replicas.replicas.engines]
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    assert not groups[0] & groups[1]
    assert groups[0] | groups[1] == set(jax.devices()[:4])


def test_same_greedy_outputs_as_one_replica(replicas):
    texts = [f"Fact {i}: the capital of country number {i} is" for i in range(6)]
    routed_before = list(replicas.replicas.num_routed)
    got = [r["output_ids"] for r in replicas.generate(texts, GREEDY)]
    routed = [a - b for a, b in zip(replicas.replicas.num_routed, routed_before, strict=True)]
    assert sum(routed) == 6 and min(routed) >= 1  # both replicas served
    with Generator(tp_size=2, progress=False, **COMMON) as one:
        expected = [r["output_ids"] for r in one.generate(texts, GREEDY)]
    assert got == expected
    assert replicas.check_integrity() == {"running": 0, "waiting": 0}


def _grouped_prompts(groups: int, per_group: int) -> list[list[int]]:
    """A long system prompt per group (5 pages), then a short question; shuffled."""
    rng = random.Random(0)
    prompts = []
    for _ in range(groups):
        system = [rng.randrange(10, 250) for _ in range(80)]
        for _ in range(per_group):
            prompts.append(system + [rng.randrange(10, 250) for _ in range(8)])
    rng.shuffle(prompts)
    return prompts


def _hit_rate(method: str, tiny_model) -> float:
    """Only token ids matter to the caches: a small random model serves."""
    with Generator(
        str(tiny_model), load_format="dummy", dp_size=2, tp_size=1,
        load_balance_method=method, progress=False, **COMMON,
    ) as g:  # fmt: skip
        prompts = _grouped_prompts(groups=6, per_group=3)
        for ids in prompts:  # one at a time: each sees what the earlier ones cached
            g.generate(input_ids=ids, sampling_params={"max_new_tokens": 1})
        metrics = g.metrics()
        assert metrics["num_requests_total"] == len(prompts)
        assert g.check_integrity() == {"running": 0, "waiting": 0}
        return metrics["cache_hit_rate"]


def test_cache_aware_routing_beats_round_robin_on_grouped_prompts(tmp_path):
    make_tiny("llama31_tied_gqa4", tmp_path)
    aware, rr = _hit_rate("cache_aware", tmp_path), _hit_rate("round_robin", tmp_path)
    assert aware >= 1.5 * rr > 0, (aware, rr)


def test_first_replica_compiles_before_the_others_start(tmp_path, monkeypatch):
    """Warm-up of replica 0 ends before any other replica's begins: on GPUs those find its
    programs in the persistent compilation cache. Each replica still warms every shape, and
    the replicas then serve."""
    from jaxsgl.engine.model_runner import ModelRunner

    make_tiny("llama31_tied_gqa4", tmp_path / "model")
    spans = {}  # first device id -> (start, end, shapes warmed)
    warmup = ModelRunner.warmup

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        n = warmup(self, *args, **kwargs)
        spans[self.loaded.mesh.devices.flat[0].id] = (start, time.perf_counter(), n)
        return n

    monkeypatch.setattr(ModelRunner, "warmup", timed)
    options = {**COMMON, "warmup": True, "context_length": 32, "max_running_requests": 1,
               "chunked_prefill_size": 16}  # fmt: skip
    with Generator(
        str(tmp_path / "model"), load_format="dummy", dp_size=2, tp_size=1,
        compilation_cache_dir=str(tmp_path / "xla"), progress=False, **options,
    ) as g:  # fmt: skip
        out = g.generate(input_ids=[[5, 6, 7]] * 2, sampling_params=GREEDY)
        assert [len(r["output_ids"]) for r in out] == [12] * 2
        assert g.check_integrity() == {"running": 0, "waiting": 0}
    assert sorted(spans) == [0, 1]
    first_end, shapes = spans[0][1], spans[0][2]
    assert shapes > 1 and all(n == shapes for _, _, n in spans.values())
    assert spans[1][0] >= first_end
