"""The compiled step writes the KV pool in place: no copy of the pool in any step shape the
runner makes (a copy costs a pass over the whole pool per step, however small the batch)."""

from __future__ import annotations

import re

import pytest
from tiny_models import make_tiny

from jaxsgl.engine.model_runner import ModelRunner
from jaxsgl.model.forward_batch import SeqChunk
from jaxsgl.model.loader import load_model
from jaxsgl.sampler import RowState
from jaxsgl.sampling_params import SamplingParams
from jaxsgl.sharding import make_mesh

GREEDY = RowState(params=SamplingParams(temperature=0.0), seed=0)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gqa4")
    make_tiny("llama31_tied_gqa4", folder)
    loaded = load_model(str(folder), load_format="dummy", dtype="float32", mesh=make_mesh(1))
    return ModelRunner(loaded, 257, 16, loaded.config.vocab_size, attention_backend="native")


@pytest.mark.parametrize(
    ("chunks", "decode", "num_steps"),
    [
        ([SeqChunk([5], 3, [2])], True, 1),  # a one-page sequence: the case XLA:CPU copied
        ([SeqChunk([5], 30, [1, 2]), SeqChunk([6], 7, [3])], True, 1),
        ([SeqChunk([5], 3, [2])], True, 4),  # four steps a launch
        ([SeqChunk([5, 6, 7], 0, [2])], False, 1),  # a short prefill
        ([SeqChunk(list(range(40)), 16, [4, 5, 6, 7])], False, 1),  # a chunk over a prefix
    ],
)
def test_no_step_copies_the_pool(runner, chunks, decode, num_steps):
    step = runner.prepare(chunks, [GREEDY] * len(chunks), decode, num_steps=num_steps)
    text = runner.compiled_text(step)
    pool = re.escape("[" + ",".join(map(str, runner.kv.k.shape)) + "]")
    copies = re.findall(rf"= \w+{pool}\S* copy\(", text)
    assert not copies, f"{len(copies)} copies of the pool in the step"
    assert step.batch.page_table.shape[1] >= 2
