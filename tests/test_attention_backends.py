"""The engine gives the same greedy tokens with either attention backend, and with the Pallas
kernels run per device under tensor parallelism (interpret mode on fake CPU devices)."""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import decode_during_prefill
from tiny_models import make_tiny

from jaxsgl.generator import Generator

GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}
# The small engine of every test here: float32 random weights, 4-token pages, 32-token chunks.
SMALL = dict(
    load_format="dummy",
    dtype="float32",
    page_size=4,
    chunked_prefill_size=32,
    max_total_tokens=1024,
    progress=False,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # 8 q heads over 2 kv heads (GQA 4), head dim 8, 3 layers, LM head untied (a tied one
    # mostly echoes the last token, whatever attention computes).
    path = tmp_path_factory.mktemp("gqa4")
    make_tiny("llama3_untied_gqa4", path)
    return path


def _prompts() -> list[list[int]]:
    rng = np.random.default_rng(7)
    shared = rng.integers(3, 250, 37).tolist()
    # Two prompts share a 37-token prefix (a radix hit for the later one), one spans several
    # prefill chunks, one is a single token.
    return [
        shared + rng.integers(3, 250, 5).tolist(),
        rng.integers(3, 250, 70).tolist(),
        [17],
        shared + rng.integers(3, 250, 11).tolist(),
    ]


def _greedy(folder, backend: str, tp: int) -> list[list[int]]:
    with Generator(
        str(folder), attention_backend=backend, tp_size=tp, max_running_requests=8,
        warmup=False, **SMALL,
    ) as gen:  # fmt: skip
        assert gen.engine.runner.loaded.model.attention.name == backend
        prompts = _prompts()
        first = gen.generate(input_ids=prompts[:2], sampling_params=GREEDY)
        rest = gen.generate(input_ids=prompts[2:], sampling_params=GREEDY)
        assert gen.check_integrity() == {"running": 0, "waiting": 0}
        assert rest[1]["meta_info"]["cached_tokens"] >= 36  # the shared prefix was reused
    return [out["output_ids"] for out in first + rest]


def test_pallas_backend_matches_native(folder):
    native = _greedy(folder, "native", 1)
    assert all(len(ids) == GREEDY["max_new_tokens"] for ids in native)
    # The outputs move with the context: a wrong attention would change them.
    assert all(len(set(ids)) >= 5 for ids in native)
    assert _greedy(folder, "pallas", 1) == native
    assert _greedy(folder, "pallas", 2) == native
    # Four and eight devices: kv heads (2) fewer than the tensor size, so they are replicated.
    assert _greedy(folder, "pallas", 4) == native
    assert _greedy(folder, "native", 8) == native


def test_pallas_warm_up_covers_extends_of_any_mix(folder):
    """With the Pallas kernels an extend's program depends only on its token and sequence
    buckets, and warm-up compiles them all: prompts of any lengths, arriving together or
    not, start without a compile."""
    settings = dict(SMALL, context_length=128, max_running_requests=4)
    prompts = _prompts()
    with Generator(str(folder), attention_backend="native", warmup=False, **settings) as gen:
        outs = gen.generate(input_ids=prompts, sampling_params=GREEDY)
        expected = [o["output_ids"] for o in outs]
    with Generator(str(folder), attention_backend="pallas", **settings) as gen:
        compiled = gen.engine.runner.num_compiled
        got = gen.generate(input_ids=prompts, sampling_params=GREEDY)
        got += gen.generate(input_ids=[p[:9] for p in prompts[:3]], sampling_params=GREEDY)
        assert gen.engine.runner.num_compiled == compiled
        assert gen.metrics()["step_compiles_total"] == 0
        extends = [n for kind, n, _ in gen.engine.stats.steps if kind == "extend"]
        assert len(extends) >= 4 and max(extends) >= 3  # several, of several sequences
        assert gen.check_integrity() == {"running": 0, "waiting": 0}
    assert [o["output_ids"] for o in got[:4]] == expected


def test_mixed_chunk_with_the_pallas_kernels(folder):
    """Decode rows inside prefill steps (one-token runs, which the Pallas backend hands to the
    decode kernel) give the tokens the native backend gives without mixing."""
    params = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
    long = _prompts()[1]  # 70 tokens: three chunks
    outputs = {}
    for backend, mixed in (("native", False), ("pallas", True)):
        with Generator(
            str(folder), attention_backend=backend, enable_mixed_chunk=mixed,
            context_length=256, warmup=False, **SMALL,
        ) as gen:  # fmt: skip
            outputs[backend] = decode_during_prefill(gen, [5, 6, 7], long, params, params)
            assert (gen.engine.stats.mixed_decode_tokens > 0) == mixed
            assert gen.check_integrity() == {"running": 0, "waiting": 0}
    assert outputs["pallas"] == outputs["native"]


def test_unknown_backend_is_a_value_error(folder):
    with pytest.raises(ValueError, match="attention_backend"):
        Generator(str(folder), load_format="dummy", attention_backend="flash", warmup=False)
