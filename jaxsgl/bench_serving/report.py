"""The printed result table, the results JSON (summary and settings) and the JSONL records."""

from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path
from typing import Any

from jaxsgl.bench_serving.metrics import LATENCIES, RequestRecord

# (label, summary key, scale, decimals): each figure the table prints.
ROWS: list[tuple[str, str, float, int]] = [
    ("Successful requests", "completed", 1, 0),
    ("Failed requests", "failed", 1, 0),
    ("Benchmark duration (s)", "duration_s", 1, 2),
    ("Total input tokens", "total_input_tokens", 1, 0),
    ("Total output tokens", "total_output_tokens", 1, 0),
    ("Request throughput (req/s)", "request_throughput", 1, 3),
    ("Input token throughput (tok/s)", "input_throughput", 1, 2),
    ("Output token throughput (tok/s)", "output_throughput", 1, 2),
    ("Total token throughput (tok/s)", "total_throughput", 1, 2),
    ("Roofline output tok/s", "roofline_output_throughput", 1, 2),
    ("Fraction of roofline", "roofline_fraction", 1, 4),
    ("Mean concurrency", "mean_concurrency", 1, 2),
    ("Cache hit rate (%)", "cache_hit_rate", 100, 2),
    ("Devices", "num_devices", 1, 0),
    ("GPU-seconds per request", "gpu_s_per_request", 1, 4),
    ("GPU-seconds per request vs baseline (x)", "gpu_s_vs_baseline", 1, 3),
]
_LATENCY_NAMES = {"e2e": "E2E latency", "ttft": "TTFT", "tpot": "TPOT", "itl": "ITL"}
_STATS = {"mean": "Mean", "median": "Median", "p90": "P90", "p95": "P95", "p99": "P99"}
for _kind in LATENCIES:
    for _stat, _name in _STATS.items():
        ROWS.append((f"{_name} {_LATENCY_NAMES[_kind]} (ms)", f"{_stat}_{_kind}_ms", 1, 2))
WIDTH = 50


def table(summary: dict[str, Any], header: dict[str, Any]) -> str:
    """The result table: `header` lines (settings) then every figure of `summary` that has a
    value, one `label   value` line each."""
    title = " Serving benchmark "
    lines = [f"{title:=^{WIDTH + 12}}"]
    lines += [f"{k + ':':<{WIDTH}}{v}" for k, v in header.items()]
    for label, key, scale, decimals in ROWS:
        value = summary.get(key)
        if key.startswith("mean_e2e"):
            lines.append(f"{' Latency ':-^{WIDTH + 12}}")
        if value is None:
            continue
        lines.append(f"{label + ':':<{WIDTH}}{_number(value * scale, decimals)}")
    lines.append("=" * (WIDTH + 12))
    return "\n".join(lines)


def parse_table(text: str) -> dict[str, float]:
    """summary key -> printed value (scaled back), for every figure row found in `text`."""
    by_label = {label: (key, scale) for label, key, scale, _ in ROWS}
    out = {}
    for line in text.splitlines():
        label, _, value = line.partition(":")
        if label in by_label and value.strip():
            key, scale = by_label[label]
            out[key] = float(value) / scale
    return out


def _number(value: float, decimals: int) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{decimals}f}"


def write_results(
    path: str | Path,
    summary: dict[str, Any],
    settings: dict[str, Any],
    details_path: str | Path | None,
) -> None:
    """The results JSON: the summary (NaN as null), the settings, and the records' path
    (relative to the results file's folder, so the two can move together)."""
    body = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "label": settings.get("label") or Path(path).stem,
        "summary": {k: _finite(v) for k, v in summary.items()},
        "settings": {k: _finite(v, "inf") for k, v in settings.items()},
        "details_file": (
            os.path.relpath(Path(details_path).resolve(), Path(path).resolve().parent)
            if details_path
            else None
        ),
    }
    Path(path).write_text(json.dumps(body, indent=2) + "\n")


def write_records(path: str | Path, records: list[RequestRecord]) -> None:
    """One JSON object per request, in sending order."""
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


def read_json_file(path: str | Path, what: str, missing: str = "does not exist") -> Any:
    """The JSON in the file `path`; ValueError naming `what` it was meant to be."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not JSON: {e}") from e


def read_results(path: str | Path) -> dict[str, Any]:
    """A results JSON as written by `write_results`."""
    body = read_json_file(path, "results file")
    if not isinstance(body, dict) or not isinstance(body.get("summary"), dict):
        raise ValueError(f"{str(path)!r} is not a bench_serving results file (no summary)")
    return body


def read_records(results: dict[str, Any], results_path: str | Path) -> list[RequestRecord]:
    """The records a results file points to (a relative path is taken from its folder)."""
    details = results.get("details_file")
    if not details:
        raise ValueError(f"{str(results_path)!r} names no per-request records file")
    path = Path(details)
    if not path.is_absolute():
        path = Path(results_path).parent / path
    if not path.is_file():
        raise ValueError(f"records file {str(path)!r} (from {str(results_path)!r}) is missing")
    with open(path) as f:
        return [RequestRecord.from_json(json.loads(line)) for line in f if line.strip()]


def baseline_gpu_s(path: str | Path) -> float:
    """The GPU-seconds per request of a baseline results file."""
    value = read_results(path)["summary"].get("gpu_s_per_request")
    if not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"baseline {str(path)!r} has no positive gpu_s_per_request")
    return float(value)


def _finite(value: Any, instead: Any = None) -> Any:
    """`value`, or `instead` for a non-finite float (strict JSON has no NaN or Infinity)."""
    return instead if isinstance(value, float) and not math.isfinite(value) else value
