"""bench_serving without a server: the metric math (against numpy), the datasets, arrivals,
the report round trip and the flag checks."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsgl.bench_serving import cli, datasets, report
from jaxsgl.bench_serving.metrics import RequestRecord, distribution, percentile, summarize
from jaxsgl.bench_serving.runner import Load, arrival_offsets


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=40),
    st.floats(0, 100),
)
def test_percentile_matches_numpy(values, q):
    assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-9, abs=1e-6)


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="101"):
        percentile([1.0], 101)


def _records(rng: np.random.Generator, n: int) -> list[RequestRecord]:
    out = []
    for i in range(n):
        start = float(rng.uniform(0, 5))
        n_out = int(rng.integers(1, 6))
        ttft = float(rng.uniform(0.01, 0.5))
        itl = rng.uniform(0.001, 0.05, n_out - 1).tolist()
        out.append(
            RequestRecord(
                index=i,
                session=i,
                turn=0,
                start=start,
                end=start + ttft + sum(itl) + 0.002,
                success=i % 7 != 3,
                error="" if i % 7 != 3 else "HTTP 500",
                prompt_tokens=int(rng.integers(5, 50)),
                output_tokens=n_out,
                cached_tokens=int(rng.integers(0, 5)),
                ttft=ttft,
                itl=itl,
            )
        )
    return out


def test_summary_against_numpy():
    records = _records(np.random.default_rng(0), 30)
    ok = [r for r in records if r.success]
    s = summarize(records, num_devices=4, baseline_gpu_s=2.0)
    duration = max(r.end for r in records) - min(r.start for r in records)
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    assert s["completed"] == len(ok) and s["failed"] == len(records) - len(ok) > 0
    assert s["duration_s"] == pytest.approx(duration)
    assert s["request_throughput"] == pytest.approx(len(ok) / duration)
    assert s["total_throughput"] == pytest.approx((prompt + output) / duration)
    assert s["cache_hit_rate"] == pytest.approx(sum(r.cached_tokens for r in ok) / prompt)
    assert s["mean_concurrency"] == pytest.approx(sum(r.end - r.start for r in ok) / duration)
    assert s["gpu_s_per_request"] == pytest.approx(4 * duration / len(ok))
    assert s["gpu_s_vs_baseline"] == pytest.approx(4 * duration / len(ok) / 2.0)
    e2e = np.array([r.end - r.start for r in ok]) * 1e3
    tpot = np.array(
        [(r.end - r.start - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    )
    itl = np.concatenate([r.itl for r in ok]) * 1e3
    for name, values in [("e2e", e2e), ("tpot", tpot * 1e3), ("itl", itl)]:
        assert s[f"mean_{name}_ms"] == pytest.approx(values.mean())
        for p in (50, 90, 95, 99):
            key = f"{'median' if p == 50 else f'p{p}'}_{name}_ms"
            assert s[key] == pytest.approx(np.percentile(values, p)), key


def test_summary_edge_cases():
    one = RequestRecord(0, 0, 0, 0.0, 1.0, True, prompt_tokens=4, output_tokens=1, ttft=1.0)
    s = summarize([one], num_devices=1)
    assert math.isnan(s["mean_tpot_ms"]) and math.isnan(s["p99_itl_ms"])  # one token: no gaps
    assert s["gpu_s_vs_baseline"] is None and s["mean_ttft_ms"] == pytest.approx(1000)
    with pytest.raises(ValueError, match="no requests"):
        summarize([], 1)
    with pytest.raises(ValueError, match="num_devices"):
        summarize([one], 0)
    assert distribution([2.0])["p99"] == 2.0


def test_table_prints_every_figure_and_parses_back():
    s = summarize(_records(np.random.default_rng(1), 12), num_devices=2, baseline_gpu_s=1.0)
    s.update(roofline_output_throughput=123.456, roofline_fraction=0.71234)
    text = report.table(s, {"Backend": "jaxsgl"})
    parsed = report.parse_table(text)
    assert set(parsed) == {key for _, key, _, _ in report.ROWS}
    for key, value in parsed.items():
        assert value == pytest.approx(s[key], abs=0.01), key


def test_record_json_round_trip(tmp_path):
    records = _records(np.random.default_rng(2), 5)
    report.write_records(tmp_path / "r.jsonl", records)
    settings = {"request_rate": math.inf}
    report.write_results(tmp_path / "r.json", summarize(records, 1), settings, tmp_path / "r.jsonl")
    text = (tmp_path / "r.json").read_text()
    assert "Infinity" not in text and "NaN" not in text  # strict JSON
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the results"))
    assert results["settings"]["request_rate"] == "inf"
    assert report.read_records(results, tmp_path / "r.json") == records
    assert report.baseline_gpu_s(tmp_path / "r.json") == results["summary"]["gpu_s_per_request"]


def test_results_move_with_their_records_and_table_ratios(tmp_path):
    import importlib.util
    import shutil
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "serving_table.py"
    spec = importlib.util.spec_from_file_location("serving_table", script)
    serving_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving_table)

    rng = np.random.default_rng(3)
    for name, devices in (("base", 1), ("two", 2)):
        records = _records(rng, 20)
        report.write_records(tmp_path / f"{name}.jsonl", records)
        summary = summarize(records, devices)
        report.write_results(tmp_path / f"{name}.json", summary, {}, tmp_path / f"{name}.jsonl")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for f in list(tmp_path.glob("*.json*")):
        shutil.move(f, moved / f.name)
    results = report.read_results(moved / "two.json")
    assert results["details_file"] == "two.jsonl"
    assert len(report.read_records(results, moved / "two.json")) == 20  # beside the moved file

    base = report.read_results(moved / "base.json")["summary"]
    two = results["summary"]
    [row_base, row_two] = serving_table.table_rows(
        [str(moved / "base.json"), str(moved / "two.json")], str(moved / "base.json")
    )
    assert row_base["x_throughput"] == row_base["x_cost"] == row_base["x_p99"] == 1.0
    assert row_two["x_throughput"] == pytest.approx(
        two["request_throughput"] / base["request_throughput"]
    )
    assert row_two["x_p99"] == pytest.approx(two["p99_e2e_ms"] / base["p99_e2e_ms"])
    assert row_two["x_cost"] == pytest.approx(two["gpu_s_per_request"] / base["gpu_s_per_request"])
    lines = serving_table.markdown([row_base, row_two]).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| two | 2 |")
    assert f"{row_two['x_cost']:.2f} |" in lines[3]
    failed = dict(row_two, p99_e2e_ms=None, x_p99=None)  # a run where nothing succeeded
    assert serving_table.markdown([failed]).splitlines()[2].count("| n/a |") == 2  # P99, P99 ×


class _Space(datasets.TokenSpace):
    def __init__(self, seed=0, vocab=1000):
        super().__init__(np.random.default_rng(seed), vocab)


def test_random_lengths_within_range():
    sessions = datasets.random_sessions(_Space(), 100, 20, 0.5)
    prompts = [next(sessions)[0] for _ in range(200)]
    assert all(50 <= len(p.ids) <= 100 and 10 <= p.output_len <= 20 for p in prompts)
    assert {len(p.ids) for p in prompts} != {100}
    exact = next(datasets.random_sessions(_Space(), 7, 3, 1.0))[0]
    assert len(exact.ids) == exact.num_tokens == 7 and exact.output_len == 3
    with pytest.raises(ValueError, match="range-ratio"):
        next(datasets.random_sessions(_Space(), 7, 3, 1.5))


def test_shared_prefix_groups():
    sessions = datasets.shared_prefix_sessions(_Space(), 3, 4, 16, 5, 8)
    prompts = [next(sessions)[0] for _ in range(12)]
    prefixes = [tuple(p.ids[:16]) for p in prompts]
    assert sorted(prefixes.count(x) for x in set(prefixes)) == [4, 4, 4]
    assert all(len(p.ids) == 21 and p.output_len == 8 for p in prompts)
    assert prefixes[:4] != [prefixes[0]] * 4  # shuffled across groups
    with pytest.raises(ValueError, match="--gsp-question-len"):
        next(datasets.shared_prefix_sessions(_Space(), 3, 4, 16, 0, 8))


def test_multi_turn_prompt_holds_the_history():
    [first, second] = next(datasets.multi_turn_sessions(_Space(), 2, 6, 3))
    first = datasets.Prompt("Q1", first.ids, 3, 6)
    second = datasets.Prompt("Q2", second.ids, 3, 6)
    nxt = first.follow("A1", [7, 8, 9], second)
    assert nxt.ids == first.ids + [7, 8, 9] + second.ids and nxt.num_tokens == 15
    assert nxt.text == "Q1A1Q2"
    assert nxt.chat() == [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]


def _conversation(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


class _WordTokenizer:
    def encode(self, text):
        return text.split()


def test_sharegpt_file(tmp_path):
    path = tmp_path / "sg.json"
    entries = [
        _conversation(("human", "a b c"), ("gpt", "x y")),
        _conversation(("human", "a"), ("gpt", "x y")),  # a one-token question: left out
        _conversation(("gpt", "hi"), ("human", "q r"), ("gpt", "s t u")),
        _conversation(("human", "long " * 20), ("gpt", "x y")),  # over the context
        {"id": "no conversation"},
    ]
    path.write_text(json.dumps(entries))
    prompts = datasets.load_sharegpt(path, _WordTokenizer(), context_len=10)
    assert [(p.text, p.num_tokens, p.output_len) for p in prompts] == [
        ("a b c", 3, 2),
        ("q r", 2, 3),
    ]
    assert datasets.load_sharegpt(path, _WordTokenizer(), None, output_len=5)[0].output_len == 5
    with pytest.raises(ValueError, match="not a file"):
        datasets.load_sharegpt(tmp_path / "none.json", _WordTokenizer(), None)


def test_poisson_arrivals():
    offsets = arrival_offsets(50.0, np.random.default_rng(0))
    times = np.array([next(offsets) for _ in range(4001)])
    assert times[0] == 0 and np.all(np.diff(times) > 0)
    assert np.diff(times).mean() == pytest.approx(1 / 50, rel=0.05)
    inf = arrival_offsets(math.inf, np.random.default_rng(0))
    assert [next(inf) for _ in range(3)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-prompts", "0"], "--num-prompts must be >= 1"),
        (["--num-prompts", "4", "--duration", "3"], "exclude each other"),
        (["--dataset-name", "sharegpt"], "needs --dataset-path"),
        (["--dataset-name", "multi-turn", "--num-prompts", "3"], "--mt-num-sessions"),
        (["--request-rate", "0"], "--request-rate must be > 0"),
        (["--max-concurrency", "0"], "--max-concurrency must be >= 1"),
        (["--duration", "5"], "needs --max-concurrency"),
        (["--warmup-requests", "-1"], "--warmup-requests"),
        (["--random-input-len", "0"], "--random-input-len must be >= 1"),
        (["--mt-turns", "0"], "--mt-turns must be >= 1"),
        (["--gsp-output-len", "-2"], "--gsp-output-len must be >= 1"),
        (["--random-range-ratio", "2"], "--random-range-ratio must be within 0..1"),
        (["--baseline", "/no/such.json"], "does not exist"),
    ],
)
def test_bad_flags(flags, message):
    with pytest.raises(ValueError, match=message):
        cli.check_args(cli.build_parser().parse_args(flags))


def test_load_needs_a_length():
    with pytest.raises(ValueError, match="either"):
        Load()
