"""The workload roofline of bench_serving: the docstring's worked example, the closed forms
against a token-by-token numpy count on made-up records, and the flags' checks."""

import dataclasses

import numpy as np
import pytest
from roofline_reference import reference_roofline

from jaxsgl.bench_serving import cli
from jaxsgl.bench_serving.metrics import RequestRecord
from jaxsgl.bench_serving.roofline import workload_roofline
from jaxsgl.ceilings import Ceilings
from jaxsgl.config import PRESETS
from jaxsgl.model_cost import ModelCost

TOY = ModelCost(
    weight_bytes=1200,
    step_weight_bytes=1000,
    matmul_params=100,
    head_params=20,
    kv_bytes_per_token=10,
    attn_flops_per_key=4,
)


def _record(i, prompt, output, cached=0, success=True, end=1.0) -> RequestRecord:
    return RequestRecord(
        i, i, 0, 0.0, end, success, prompt_tokens=prompt, output_tokens=output,
        cached_tokens=cached,
    )  # fmt: skip


def test_worked_example():
    records = [_record(0, 4, 3, end=9.304), _record(1, 6, 2, cached=2)]
    roof = workload_roofline(records, TOY, Ceilings(1000.0, 1000.0, "toy"), max_concurrency=1)
    assert roof.prefill_s == pytest.approx(1.472) and roof.decode_s == pytest.approx(3.18)
    assert roof.decode_steps == 3 and roof.output_tokens == 5
    assert roof.output_throughput == pytest.approx(5 / 4.652)
    assert roof.summary(9.304)["roofline_fraction"] == pytest.approx(0.5)
    # No cap: both sequences share a step, so a request's own length bounds the steps.
    assert workload_roofline(records, TOY, Ceilings(1000.0, 1000.0, "toy")).decode_steps == 2


def _made_up(rng: np.random.Generator, n: int) -> list[RequestRecord]:
    out = []
    for i in range(n):
        prompt = int(rng.integers(1, 300))
        cached = int(rng.integers(0, prompt + 1)) if i % 3 else 0
        out.append(_record(i, prompt, int(rng.integers(0, 200)), cached, success=i % 11 != 5))
    return out


@pytest.mark.parametrize("cap", [None, 1, 7, 64])
@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("ceilings", [(0.01, 0.1), (3.0, 700.0), (3.0, 0.5)])
def test_against_a_token_by_token_count(cap, devices, ceilings):
    records = _made_up(np.random.default_rng(cap or 0), 40)
    cost = ModelCost.from_config(PRESETS["llama-3-8b"])
    given = Ceilings.of(*ceilings)
    roof = workload_roofline(records, cost, given, cap, devices)
    rows = [dataclasses.asdict(r) for r in records]
    seconds, steps = reference_roofline(
        rows, cost, given.copy_bytes_per_s, given.matmul_flops_per_s, cap, devices
    )
    assert roof.seconds == pytest.approx(seconds, rel=1e-9) and roof.decode_steps == steps
    assert roof.output_tokens == sum(r.output_tokens for r in records if r.success)


def test_cached_tokens_and_the_cap_lower_the_floor():
    cost = ModelCost.from_config(PRESETS["llama-3-8b"])
    ceilings = Ceilings.of(3.0, 700.0)
    cold = [_record(i, 512, 256) for i in range(100)]
    warm = [_record(i, 512, 256, cached=384) for i in range(100)]
    assert workload_roofline(warm, cost, ceilings).prefill_s < (
        workload_roofline(cold, cost, ceilings).prefill_s / 3
    )
    capped = workload_roofline(cold, cost, ceilings, max_concurrency=10)
    free = workload_roofline(cold, cost, ceilings)
    assert capped.decode_steps == 100 * 255 // 10 and free.decode_steps == 255
    assert capped.decode_s > free.decode_s and capped.prefill_s == free.prefill_s


def test_bad_inputs():
    one = [_record(0, 4, 3)]
    with pytest.raises(ValueError, match="no successful requests"):
        workload_roofline([_record(0, 4, 3, success=False)], TOY, Ceilings.of(1, 1))
    with pytest.raises(ValueError, match="max_concurrency must be >= 1, got 0"):
        workload_roofline(one, TOY, Ceilings.of(1, 1), max_concurrency=0)
    with pytest.raises(ValueError, match="devices must be >= 1"):
        workload_roofline(one, TOY, Ceilings.of(1, 1), devices=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--copy-tb-s", "3"], "--copy-tb-s needs --roofline-model"),
        (["--ceilings", "c.json"], "--ceilings needs --roofline-model"),
        (["--roofline-model", "llama-3-8b"], "needs the ceilings"),
        (["--roofline-model", "llama-3-8b", "--copy-tb-s", "3"], "needs the ceilings"),
        (["--roofline-model", "llama-3-8b", "--matmul-tflop-s", "9"], "needs the ceilings"),
        (
            ["--roofline-model", "llama-3-8b", "--ceilings", "c.json", "--copy-tb-s", "3"],
            "exclude each other",
        ),
        (
            ["--roofline-model", "llama-3-8b", "--copy-tb-s", "0", "--matmul-tflop-s", "9"],
            "--copy-tb-s must be > 0, got 0.0",
        ),
        (
            ["--roofline-model", "llama-9", "--copy-tb-s", "3", "--matmul-tflop-s", "9"],
            "preset name",
        ),
        (["--roofline-model", "llama-3-8b", "--ceilings", "/no/such.json"], "does not exist"),
    ],
)
def test_bad_roofline_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        cli.check_args(cli.build_parser().parse_args(flags))


def test_half_given_ceilings_exit_2(capsys):
    assert cli.main(["--roofline-model", "llama-3-8b", "--copy-tb-s", "3"]) == 2
    assert "error: --roofline-model needs the ceilings" in capsys.readouterr().err
