"""The serving table of RESULTS.md from bench_serving results files: each run's throughput,
P99 latency and cost per request (GPU-seconds per request), and each as a ratio to a baseline
run — the deployment table of the design notes, measured.

    python benchmarks/serving_table.py results/mt-*.json --baseline results/mt-tp1-noradix.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxsgl.bench_serving.report import read_results

COLUMNS = (
    ("run", "{label}"),
    ("GPUs", "{num_devices}"),
    ("req/s", "{request_throughput:.2f}"),
    ("out tok/s", "{output_throughput:.0f}"),
    ("P99 E2E ms", "{p99_e2e_ms:.0f}"),
    ("P99 TTFT ms", "{p99_ttft_ms:.0f}"),
    ("cache hit", "{cache_hit_rate:.1%}"),
    ("GPU-s/req", "{gpu_s_per_request:.3f}"),
    ("req/s ×", "{x_throughput:.2f}"),
    ("P99 ×", "{x_p99:.2f}"),
    ("cost ×", "{x_cost:.2f}"),
)


def table_rows(paths: list[str], baseline: str) -> list[dict]:
    """One row of figures a results file, with the ratios to `baseline`'s."""
    base = read_results(baseline)["summary"]
    rows = []
    for path in paths:
        results = read_results(path)
        s = dict(results["summary"])
        s["label"] = results.get("label") or Path(path).stem
        s["x_throughput"] = _ratio(s["request_throughput"], base["request_throughput"])
        s["x_p99"] = _ratio(s["p99_e2e_ms"], base["p99_e2e_ms"])
        s["x_cost"] = _ratio(s["gpu_s_per_request"], base["gpu_s_per_request"])
        rows.append(s)
    return rows


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table; a figure a run lacks (no request succeeded) is n/a."""
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |"]
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        cells = []
        for _, fmt in COLUMNS:
            try:
                cells.append(fmt.format(**row))
            except (TypeError, KeyError):
                cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="bench_serving --output-file JSONs")
    p.add_argument("--baseline", required=True, help="the run every ratio is taken against")
    args = p.parse_args(argv)
    found = [path for path in args.results if Path(path).is_file()]
    for path in sorted(set(args.results) - set(found)):
        print(f"(no results file {path})")
    print(markdown(table_rows(found, args.baseline)))


if __name__ == "__main__":
    main()
