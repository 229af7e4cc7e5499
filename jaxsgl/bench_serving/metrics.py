"""Per-request records and the summary figures computed from them.

Every figure in a summary is a function of the records alone (plus the device count), so a
results file can be checked against its JSONL records: the duration is the span from the first
request's start to the last request's end, and the latency figures cover successful requests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 95, 99)
LATENCIES = ("e2e", "ttft", "tpot", "itl")  # the figures that get mean/median/P90/P95/P99


@dataclasses.dataclass
class RequestRecord:
    """One measured request. Times are seconds since the run began."""

    index: int  # order of sending
    session: int  # the conversation it belongs to (single-turn datasets: one per request)
    turn: int  # 0 for the first (or only) turn
    start: float
    end: float
    success: bool
    error: str = ""
    prompt_tokens: int = 0  # as the server counted them (our count if it said nothing)
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache
    requested_output_tokens: int = 0
    ttft: float | None = None  # seconds from start to the first output token
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between token arrivals

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (output tokens - 1)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> RequestRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's
    default): for [1, 2, 3, 4] the 50th is 2.5 and the 90th is 3.7."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """mean, median and P90/P95/P99 of `values` (NaN for all when empty)."""
    if not values:
        return {"mean": math.nan, **{_pname(p): math.nan for p in PERCENTILES}}
    out = {"mean": sum(values) / len(values)}
    out.update({_pname(p): percentile(values, p) for p in PERCENTILES})
    return out


def _pname(p: int) -> str:
    return "median" if p == 50 else f"p{p}"


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Seconds, per latency kind, over successful requests: E2E and TTFT per request, TPOT per
    request with two or more output tokens, ITL per gap between tokens of any request."""
    ok = [r for r in records if r.success]
    return {
        "e2e": [r.latency for r in ok],
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for r in ok if (t := r.tpot) is not None],
        "itl": [gap for r in ok for gap in r.itl],
    }


def summarize(
    records: Sequence[RequestRecord], num_devices: int, baseline_gpu_s: float | None = None
) -> dict[str, float | int | None]:
    """The run's figures: throughputs, concurrency, cache hit rate, device-seconds per request
    (and its ratio to a baseline's), and latency distributions in milliseconds."""
    if not records:
        raise ValueError("no requests were measured")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    ok = [r for r in records if r.success]
    duration = max(r.end for r in records) - min(r.start for r in records)
    duration = max(duration, 1e-9)
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    gpu_s = num_devices * duration / len(ok) if ok else math.nan
    summary: dict[str, float | int | None] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "request_throughput": len(ok) / duration,
        "input_throughput": prompt / duration,
        "output_throughput": output / duration,
        "total_throughput": (prompt + output) / duration,
        "mean_concurrency": sum(r.latency for r in ok) / duration,
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "num_devices": num_devices,
        "gpu_s_per_request": gpu_s,
        "gpu_s_vs_baseline": gpu_s / baseline_gpu_s if baseline_gpu_s else None,
    }
    for kind, values in latency_samples(records).items():
        for stat, seconds in distribution(values).items():
            summary[f"{stat}_{kind}_ms"] = seconds * 1e3
    return summary
