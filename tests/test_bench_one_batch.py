"""bench_one_batch on the CPU with a tiny model: each figure of a row follows from the row's own
measurements, its floors from the model's bytes and FLOPs on the given ceilings times the
devices, the result file holds the printed rows, and `--profile` leaves a trace of each case's
decode launches."""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path

import pytest

from jaxsgl.bench_one_batch import main
from jaxsgl.ceilings import Ceilings, write_ceilings
from jaxsgl.config import config_for
from jaxsgl.model_cost import ModelCost

MODEL = str(Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "tiny-gqa4")


def test_rows_follow_from_their_measurements_and_each_case_is_traced(tmp_path, monkeypatch):
    tp = 2  # two fake CPU devices: the ceilings count twice
    monkeypatch.setenv("JAXSGL_PROFILER_DIR", str(tmp_path / "traces"))
    result_file, ceilings_file = tmp_path / "rows.jsonl", tmp_path / "ceilings.json"
    write_ceilings(ceilings_file, Ceilings.of(0.02, 0.5, "a slow CPU"))
    rows = main(
        ["--model-path", MODEL, "--load-format", "dummy", "--dtype", "float32",
         "--tp-size", str(tp), "--batch-size", "1", "3", "--input-len", "20",
         "--output-len", "4", "--num-continuous-decode-steps", "2",
         "--ceilings", str(ceilings_file), "--result-file", str(result_file), "--profile"]
    )  # fmt: skip
    cost = ModelCost.from_config(config_for(MODEL), "float32")
    ceil = Ceilings.of(0.02 * tp, 0.5 * tp)  # the mesh's devices add up
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in rows] == [
        (1, 20, 4),
        (3, 20, 4),
    ]
    assert [json.loads(line) for line in result_file.read_text().splitlines()] == rows
    for r in rows:
        bs = r["batch_size"]
        assert r["tp_size"] == tp and r["decode_steps_per_launch"] == 2
        assert r["copy_tb_s"] == 0.02 and r["matmul_tflop_s"] == 0.5
        assert r["prefill_floor_ms"] == pytest.approx(ceil.floor(*cost.prefill(bs, 20)) * 1e3)
        # Decode steps are priced at the middle of their context: 20 + 4 // 2 tokens.
        assert r["decode_floor_ms"] == pytest.approx(ceil.floor(*cost.decode(bs, 22)) * 1e3)
        assert r["prefill_tok_s"] == pytest.approx(bs * 20 / (r["prefill_ms"] / 1e3))
        assert r["decode_tok_s"] == pytest.approx(bs / (r["decode_step_ms"] / 1e3))
        assert r["host_ms"] == pytest.approx(r["decode_step_ms"] - r["decode_device_ms"])
        assert r["prefill_x_floor"] == pytest.approx(r["prefill_ms"] / r["prefill_floor_ms"])
        assert r["decode_x_floor"] == pytest.approx(r["decode_step_ms"] / r["decode_floor_ms"])
        launch_x = r["decode_launch_ms_per_step"] / r["decode_floor_ms"]
        assert r["decode_launch_x_floor"] == pytest.approx(launch_x)
        assert min(r["prefill_ms"], r["decode_step_ms"], r["decode_launch_ms_per_step"]) > 0

        folder = r["profile_dir"]
        assert folder == os.path.join(
            tmp_path, "traces", f"bench_one_batch-tp{tp}-bs{bs}-in20-out4"
        )
        # The traced launches of the runner's compiled step: three decode launches in the
        # case's folder, one prefill in its "-prefill" sibling.
        for traced in (folder, folder + "-prefill"):
            assert _step_launches(traced), f"no launch of the step program in {traced}"


def _step_launches(folder: str) -> list[dict]:
    (trace,) = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(trace) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return [e for e in events if e.get("ph") == "X" and "_step" in str(e.get("name"))]
