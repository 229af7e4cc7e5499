"""`python -m jaxsgl.bench_serving plot a.json b.json --out cmp.png`: results files side by
side — throughput and P99 latency bars, and latency CDFs drawn from their per-request records.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxsgl.bench_serving.metrics import latency_samples
from jaxsgl.bench_serving.report import read_records, read_results

_CDFS = (("e2e", "E2E latency"), ("ttft", "TTFT"), ("itl", "Inter-token latency"))


def plot_results(paths: list[str], out: str | Path) -> Path:
    """Write the comparison PNG of the results files at `paths`; returns its path."""
    if not paths:
        raise ValueError("plot needs at least one results file")
    runs = []
    for path in paths:
        results = read_results(path)
        samples = latency_samples(read_records(results, path))
        runs.append((results.get("label") or Path(path).stem, results["summary"], samples))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    labels = [label for label, _, _ in runs]
    _bars(axes[0, 0], labels, [s["request_throughput"] for _, s, _ in runs], "requests / s")
    _bars(axes[0, 1], labels, [s["output_throughput"] for _, s, _ in runs], "output tokens / s")
    _p99_bars(axes[0, 2], runs)
    for ax, (kind, title) in zip(axes[1], _CDFS, strict=True):
        for label, _, samples in runs:
            values = np.sort(np.asarray(samples[kind]) * 1e3)
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, label=label)
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests")
        if kind == "itl":
            ax.set_ylabel("fraction of token gaps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _bars(ax, labels: list[str], values: list[float], title: str) -> None:
    x = np.arange(len(labels))
    ax.bar(x, [v or 0.0 for v in values], color=[f"C{i}" for i in range(len(labels))])
    ax.set_xticks(x, labels, rotation=15, ha="right", fontsize="small")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _p99_bars(ax, runs) -> None:
    kinds = [("p99_e2e_ms", "E2E"), ("p99_ttft_ms", "TTFT"), ("p99_itl_ms", "ITL")]
    width = 0.8 / len(runs)
    x = np.arange(len(kinds))
    for i, (label, summary, _) in enumerate(runs):
        ax.bar(x + i * width, [summary.get(k) or np.nan for k, _ in kinds], width, label=label)
    ax.set_xticks(x + width * (len(runs) - 1) / 2, [name for _, name in kinds])
    ax.set(title="P99 latency", ylabel="ms", yscale="log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="jaxsgl.bench_serving plot", description=__doc__.strip().split("\n")[0]
    )
    p.add_argument("results", nargs="+", help="results JSON files (from --output-file)")
    p.add_argument("--out", default="bench_serving.png", help="the PNG to write")
    args = p.parse_args(argv)
    out = plot_results(args.results, args.out)
    print(f"wrote {out}")
    return 0
