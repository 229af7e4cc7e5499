"""`python -m jaxsgl.bench_serving` against a live server with the real SmolLM2: every dataset,
the native and both OpenAI targets, and every printed figure recomputed from the JSONL records.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from roofline_reference import reference_roofline
from server_fixture import free_port, scrape, value

from jaxsgl.bench_serving import cli, report
from jaxsgl.config import config_for
from jaxsgl.model_cost import ModelCost

pytest_plugins = ["server_fixture"]

pytestmark = pytest.mark.slow


def bench(capsys, server, out, *flags: str) -> tuple[dict, dict, list[dict]]:
    """Run the CLI in this process: (printed figures, results JSON, records)."""
    argv = ["--base-url", server.url, "--disable-tqdm", "--output-file", str(out)]
    code = cli.main([*argv, "--warmup-requests", "0", *flags])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    figures = report.parse_table(printed.out)
    check_figures(figures, results, records)
    settings = results["settings"]
    n, seconds = (settings[k] for k in ("server_step_compiles", "server_step_compile_s"))
    assert "Server step compiles in the run:" in printed.out
    assert f"{n} ({seconds:.1f} s)" in printed.out
    steps, tokens, t = (settings[f"server_extend_{k}"] for k in ("steps", "tokens", "s"))
    extend = f"{steps} ({tokens / max(steps, 1):.0f} new tokens each, {t:.1f} s)"
    assert "Server extend steps in the run:" in printed.out and extend in printed.out
    launches, steps, t = (settings[f"server_decode_{k}"] for k in ("launches", "steps", "s"))
    decode = f"{launches} ({steps / max(launches, 1):.2f} steps each, {t:.1f} s)"
    assert "Server decode launches in the run:" in printed.out and decode in printed.out
    # The engine's busy time fits in the run, and every step computed something.
    busy = settings["server_extend_s"] + settings["server_decode_s"]
    assert 0 < busy <= results["summary"]["duration_s"] + 1.0
    assert launches <= steps and tokens >= settings["server_extend_steps"] >= 1
    return figures, results, records


def expected_figures(records: list[dict], settings: dict, baseline: float | None) -> dict:
    """The summary recomputed with numpy from the raw records."""
    num_devices = settings["num_devices"]
    ok = [r for r in records if r["success"]]
    duration = max(r["end"] for r in records) - min(r["start"] for r in records)
    latency = np.array([r["end"] - r["start"] for r in ok])
    ttft = np.array([r["ttft"] for r in ok])
    tpot = np.array(
        [
            (r["end"] - r["start"] - r["ttft"]) / (r["output_tokens"] - 1)
            for r in ok
            if r["output_tokens"] > 1
        ]
    )
    itl = np.array([gap for r in ok for gap in r["itl"]])
    prompt = sum(r["prompt_tokens"] for r in ok)
    output = sum(r["output_tokens"] for r in ok)
    gpu_s = num_devices * duration / len(ok)
    out = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(ok) / duration,
        "input_throughput": prompt / duration,
        "output_throughput": output / duration,
        "total_throughput": (prompt + output) / duration,
        "mean_concurrency": latency.sum() / duration,
        "cache_hit_rate": sum(r["cached_tokens"] for r in ok) / prompt,
        "num_devices": num_devices,
        "gpu_s_per_request": gpu_s,
    }
    if baseline is not None:
        out["gpu_s_vs_baseline"] = gpu_s / baseline
    if settings.get("roofline_model"):
        out.update(expected_roofline(records, settings, duration, output))
    for name, seconds in [("e2e", latency), ("ttft", ttft), ("tpot", tpot), ("itl", itl)]:
        ms = seconds * 1e3
        out[f"mean_{name}_ms"] = ms.mean() if ms.size else np.nan
        for p, stat in [(50, "median"), (90, "p90"), (95, "p95"), (99, "p99")]:
            out[f"{stat}_{name}_ms"] = np.percentile(ms, p) if ms.size else np.nan
    return out


def expected_roofline(records: list[dict], settings: dict, duration: float, output: int) -> dict:
    """The roofline figures recomputed token by token from the records and the flags."""
    cost = ModelCost.from_config(config_for(settings["roofline_model"]), settings["roofline_dtype"])
    ceilings = settings["roofline_ceilings"]
    seconds, _ = reference_roofline(
        records,
        cost,
        ceilings["copy_tb_s"] * 1e12,
        ceilings["matmul_tflop_s"] * 1e12,
        settings["max_concurrency"],
        settings["num_devices"],
    )
    return {"roofline_output_throughput": output / seconds, "roofline_fraction": seconds / duration}


def check_figures(figures: dict, results: dict, records: list[dict]) -> None:
    settings = results["settings"]
    baseline = None
    if settings.get("baseline"):
        baseline = report.read_results(settings["baseline"])["summary"]["gpu_s_per_request"]
    expected = expected_figures(records, settings, baseline)
    decimals = {key: (scale, d) for _, key, scale, d in report.ROWS}
    assert set(figures) == set(expected) - {k for k, v in expected.items() if np.isnan(v)}
    for key, printed in figures.items():
        scale, d = decimals[key]
        tolerance = 0.51 * 10.0**-d / scale  # the printed rounding
        assert printed == pytest.approx(expected[key], abs=tolerance), key
        assert results["summary"][key] == pytest.approx(expected[key], rel=1e-9), key


def test_random_native(server, capsys, tmp_path):
    before = scrape(server)
    figures, results, records = bench(
        capsys, server, tmp_path / "native.json",
        "--num-prompts", "6", "--random-input-len", "12", "--random-output-len", "8",
        "--max-concurrency", "4", "--request-rate", "40", "--flush-cache",
        "--warmup-requests", "2", "--label", "native",
    )  # fmt: skip
    assert len(records) == 6 and figures["completed"] == 6 and figures["failed"] == 0
    # ids are sent as they are, and ignore_eos makes every output as long as asked
    assert all(r["prompt_tokens"] == 12 and r["output_tokens"] == 8 for r in records)
    assert all(r["cached_tokens"] == 0 for r in records)  # flushed; prompts under a page
    assert all(1 <= len(r["itl"]) <= 7 and 0 < r["ttft"] < r["end"] - r["start"] for r in records)
    assert results["summary"]["num_devices"] == 1 == server.server_info()["tp_size"]
    # The server's pauses to compile, counted over the timed run: within what /metrics saw
    # over the whole call.
    after = scrape(server)
    compiled = value(after, "jaxsgl:step_compiles_total")
    compiled -= value(before, "jaxsgl:step_compiles_total")
    assert 0 <= results["settings"]["server_step_compiles"] <= compiled
    # The run's steps, from /server_info, within what /metrics counted over the whole call
    # (which adds the warm-up requests): 6 prompts of 12 tokens, 7 decode tokens each.
    grown = lambda name: value(after, name) - value(before, name)
    settings = results["settings"]
    assert 1 <= settings["server_extend_steps"] <= grown("jaxsgl:extend_steps_total")
    assert settings["server_extend_tokens"] == 6 * 12  # flushed first: nothing cached
    assert settings["server_extend_tokens"] <= grown("jaxsgl:extend_tokens_total")
    assert settings["server_decode_steps"] >= 7  # at least the longest request's
    assert settings["server_decode_steps"] <= grown("jaxsgl:decode_steps_total")
    assert settings["server_decode_s"] <= grown("jaxsgl:decode_seconds_total") + 1e-9

    # The same load through /v1/completions, priced against the native run and the roofline.
    ceilings_file = tmp_path / "ceilings.json"
    ceilings_file.write_text('{"device": "test", "copy_tb_s": 0.02, "matmul_tflop_s": 0.5}')
    figures_oa, _, records_oa = bench(
        capsys, server, tmp_path / "openai.json",
        "--backend", "openai", "--num-prompts", "4", "--random-input-len", "12",
        "--random-output-len", "8", "--max-concurrency", "4", "--num-devices", "2",
        "--baseline", str(tmp_path / "native.json"), "--roofline-model", "smollm2-135m",
        "--ceilings", str(ceilings_file),
    )  # fmt: skip
    assert all(r["success"] and r["output_tokens"] == 8 for r in records_oa)
    assert figures_oa["num_devices"] == 2 and "gpu_s_vs_baseline" in figures_oa
    assert "roofline_fraction" in figures_oa

    # The ceilings as flags; no --max-concurrency: the roofline lets all requests run at once.
    figures_roof, results_roof, _ = bench(
        capsys, server, tmp_path / "roof.json",
        "--num-prompts", "5", "--random-input-len", "12", "--random-output-len", "8",
        "--roofline-model", "smollm2-135m", "--copy-tb-s", "0.01", "--matmul-tflop-s", "0.1",
    )  # fmt: skip
    # check_figures recomputed both printed roofline rows from the JSONL.
    assert figures_roof["roofline_fraction"] > 0
    settings = results_roof["settings"]
    assert settings["max_concurrency"] is None and settings["roofline_dtype"] == "bfloat16"
    assert settings["roofline_ceilings"] == {
        "device": "given",
        "copy_tb_s": 0.01,
        "matmul_tflop_s": 0.1,
    }
    assert results_roof["summary"]["roofline_decode_steps"] == 7

    png = tmp_path / "cmp.png"
    code = cli.main(["plot", str(tmp_path / "native.json"), str(tmp_path / "openai.json"),
                     "--out", str(png)])  # fmt: skip
    assert code == 0 and f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_shared_prefix_hits_the_cache(server, capsys, tmp_path):
    page = server.server_info()["page_size"]
    _, _, records = bench(
        capsys, server, tmp_path / "gsp.json",
        "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
        "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "40",
        "--gsp-question-len", "6", "--gsp-output-len", "4", "--max-concurrency", "1",
        "--flush-cache",
    )  # fmt: skip
    assert all(r["prompt_tokens"] == 46 and r["output_tokens"] == 4 for r in records)
    # One after another: the first prompt of each group computes its system prompt, the
    # other two find its full pages in the cache.
    cached = sorted(r["cached_tokens"] for r in records)
    assert cached[:2] == [0, 0] and all(c >= 40 // page * page for c in cached[2:]), cached


def test_multi_turn_native_sends_the_history(server, capsys, tmp_path):
    page = server.server_info()["page_size"]
    _, _, records = bench(
        capsys, server, tmp_path / "mt.json",
        "--dataset-name", "multi-turn", "--mt-num-sessions", "2", "--mt-turns", "3",
        "--mt-turn-len", "20", "--mt-output-len", "6", "--max-concurrency", "2",
    )  # fmt: skip
    assert len(records) == 6
    for session in (0, 1):
        turns = sorted((r for r in records if r["session"] == session), key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        assert turns[0]["prompt_tokens"] == 20
        for before, after in zip(turns, turns[1:], strict=False):
            assert after["start"] >= before["end"]  # sent once the answer arrived
            assert after["prompt_tokens"] == before["prompt_tokens"] + 6 + 20
            assert after["cached_tokens"] >= before["prompt_tokens"] // page * page > 0


def test_multi_turn_chat(server, capsys, tmp_path):
    _, _, records = bench(
        capsys, server, tmp_path / "chat.json",
        "--backend", "openai-chat", "--dataset-name", "multi-turn", "--mt-num-sessions", "2",
        "--mt-turns", "2", "--mt-turn-len", "8", "--mt-output-len", "6",
    )  # fmt: skip
    by_turn = {(r["session"], r["turn"]): r for r in records}
    assert sorted(by_turn) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for s in (0, 1):
        first, second = by_turn[s, 0], by_turn[s, 1]
        assert first["output_tokens"] == second["output_tokens"] == 6
        assert second["start"] >= first["end"]
        assert second["prompt_tokens"] > first["prompt_tokens"] + 6
        assert second["cached_tokens"] > 0


def test_sharegpt_completions(server, capsys, tmp_path):
    path = tmp_path / "sharegpt.json"
    pairs = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Name a primary color.", "Red is a primary color."),
        ("How many legs does a cat have?", "A cat has four legs."),
        ("Say hello in Spanish.", "Hola."),
    ]
    conversations = [
        {
            "id": str(i),
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}],
        }
        for i, (q, a) in enumerate(pairs)
    ]
    path.write_text(json.dumps(conversations))
    _, _, records = bench(
        capsys, server, tmp_path / "sg.json",
        "--backend", "openai", "--dataset-name", "sharegpt", "--dataset-path", str(path),
        "--num-prompts", "4", "--max-concurrency", "4",
    )  # fmt: skip
    assert len(records) == 4 and all(r["success"] for r in records)
    assert all(r["output_tokens"] == r["requested_output_tokens"] >= 2 for r in records)
    assert len({r["requested_output_tokens"] for r in records}) > 1  # the answers' lengths


def test_duration_stops_sending(server, capsys, tmp_path):
    _, _, records = bench(
        capsys, server, tmp_path / "dur.json",
        "--duration", "2", "--max-concurrency", "2", "--random-input-len", "8",
        "--random-output-len", "4",
    )  # fmt: skip
    assert len(records) >= 2 and all(r["success"] for r in records)
    assert max(r["start"] for r in records) < 2.0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxsgl.bench_serving", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_flags_give_clear_errors(tmp_path):
    r = _cli("--dataset-name", "sharegpt")
    assert r.returncode == 2 and "error: --dataset-name sharegpt needs --dataset-path" in r.stderr
    r = _cli("--backend", "vllm")
    assert r.returncode == 2 and "invalid choice: 'vllm'" in r.stderr
    r = _cli("--port", str(free_port()), "--num-prompts", "1")
    assert r.returncode == 1 and "error: cannot reach the server" in r.stderr
    r = _cli("plot", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr
