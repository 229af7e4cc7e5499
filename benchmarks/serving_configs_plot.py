"""The multi-turn serving rows under several server configurations, as one picture: for each
configuration (a folder of bench_serving results from `gpu_lanes.sh two-mt1` and `two-mt2`),
each run's throughput and cost per request as ratios to that folder's TP 1 run without the
radix cache, with the deployment table's goals drawn across. A run a folder lacks (TP 4 on a
two-card machine) has no bar.

    python benchmarks/serving_configs_plot.py --out benchmarks/serving_configs.png \\
        "bf16, 2048 a prefill step=benchmarks/results/h200x2-2026-11-27-d" ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from serving_table import table_rows

# (result files, the first found is drawn; the bars' group): DP 4 in one server or behind the
# router (`gpu_lanes.sh four-3`, `four-3r`), DP 2 x TP 2 behind it (`four-4r`).
RUNS = (
    (("mt-tp1-radix",), "TP 1 + radix"),
    (("mt-tp2-radix",), "TP 2 + radix"),
    (("mt-tp4-radix",), "TP 4 + radix"),
    (("mt-dp4r-radix", "mt-dp4-radix"), "DP 4 × TP 1 + radix"),
    (("mt-dp2tp2r-radix",), "DP 2 × TP 2 + radix"),
)
# (panel, row key, goals as (value, label)) — the ratio goals of the deployment table.
PANELS = (
    (
        "throughput × TP 1 without radix",
        "x_throughput",
        ((3.0, "radix goal, one GPU"), (5.3, "TP 4 goal")),
    ),
    ("cost per request × TP 1 without radix", "x_cost", ((0.58, "cost goal"),)),
    ("P99 E2E latency × TP 1 without radix", "x_p99", ((0.5, "P99 goal"),)),
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", help="LABEL=FOLDER, one a configuration")
    p.add_argument("--out", required=True, help="the PNG to write")
    args = p.parse_args(argv)
    configs = []
    for item in args.configs:
        label, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r} is not LABEL=FOLDER")
        base = Path(folder) / "mt-tp1-noradix.json"
        drawn = {}  # the bars' group: its file
        for files, group in RUNS:
            name = next((f for f in files if (Path(folder) / f"{f}.json").exists()), None)
            if name is not None:
                drawn[group] = Path(folder) / f"{name}.json"
        found = table_rows([str(path) for path in drawn.values()], str(base))
        rows = dict(zip(drawn, found, strict=True))
        configs.append((label, rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = min(len(configs), 3)  # the legend's columns, under the panels
    legend_rows = -(-len(configs) // ncol)
    fig, axes = plt.subplots(
        len(PANELS), 1, figsize=(2.4 * len(RUNS), 4.0 * len(PANELS) + 0.3 * legend_rows)
    )
    x = np.arange(len(RUNS))
    width = 0.8 / len(configs)
    for ax, (title, key, goals) in zip(axes, PANELS, strict=True):
        for i, (label, rows) in enumerate(configs):
            values = [rows[group][key] if group in rows else np.nan for _, group in RUNS]
            bars = ax.bar(x + i * width, values, width, label=label)
            labels = [f"{v:.2f}" if np.isfinite(v) else "" for v in values]
            ax.bar_label(bars, labels=labels, fontsize="x-small", rotation=90, padding=2)
        for value, text in goals:
            ax.axhline(value, color="k", linestyle="--", linewidth=1)
            ax.annotate(text, (x[0] - 0.1, value), ha="left", va="bottom", fontsize="small")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(x + width * (len(configs) - 1) / 2, [group for _, group in RUNS])
        ax.set_title(title, fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize="small")
    fig.tight_layout(rect=(0, 0.02 * legend_rows + 0.01, 1, 1))
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
