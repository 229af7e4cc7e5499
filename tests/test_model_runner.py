"""What XLA makes of the compiled step: the KV pool written in place (no copy of the pool in any
step shape the runner makes: a copy costs a pass over the whole pool per step, however small the
batch), and four GEMMs a layer on each card."""

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


def _layer_loop_body(text: str, num_layers: int) -> list[str]:
    """The instructions of the compiled loop over the layers: the one that runs `num_layers`
    times (attention's loop over pages has no trip count known at compile time)."""
    computations: dict[str, list[str]] = {}
    lines: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("%") and line.endswith("{"):  # "%name (params) -> result {"
            lines = computations.setdefault(line.split()[0], [])
        elif line == "}":
            lines = None
        elif lines is not None:
            lines.append(line)
    trips = f'"known_trip_count":{{"n":"{num_layers}"}}'
    loops = [line for line in text.splitlines() if " while(" in line and trips in line]
    assert len(loops) == 1, loops
    return computations[re.search(r"body=(%[^,\s]+)", loops[0]).group(1)]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_one_gemm_a_layer_each_for_qkv_o_gate_up_and_down(tmp_path, tp):
    """q/k/v and gate/up are fused at load time, so a decode step's layer runs four GEMMs on
    each card, not seven, each over the card's share of the columns (XLA's dot merger is off:
    nothing is fused at run time). The card's q/k/v columns are those its attention heads need,
    so the only collectives are o's and down's all-reduces."""
    make_tiny("llama31_tied_gqa4", tmp_path)  # D 64, 8 q and 2 kv heads of 8 dims, F 128
    loaded = load_model(tmp_path, load_format="dummy", dtype="float32", mesh=make_mesh(tp))
    runner = ModelRunner(loaded, 257, 16, loaded.config.vocab_size, attention_backend="native")
    step = runner.prepare([SeqChunk([5], 3, [2])], [GREEDY], True)
    body = _layer_loop_body(runner.compiled_text(step), loaded.config.num_layers)
    # "%dot.38 = f32[1,48]{1,0} dot(...)": the columns of each GEMM's [T, columns] result.
    columns = [int(m[1]) for line in body if (m := re.search(r"\[\d+,(\d+)\]\S* dot\(", line))]
    assert len(columns) == sum(" dot(" in line for line in body), body
    kv_heads = max(2, tp)  # repeated up to the tensor size at TP 4
    qkv = kv_heads // tp * (8 // kv_heads + 2) * 8  # the card's kv groups: q heads, k, v
    assert sorted(columns) == sorted([qkv, 64, 2 * 128 // tp, 64])
    kinds = r"all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute"
    collectives = [m[1] for line in body if (m := re.search(rf" ({kinds})(-start)?\(", line))]
    assert collectives == (["all-reduce"] * 2 if tp > 1 else [])
