"""Where a device's time goes in a profile: kernels by kind, and the time it sat idle.

Reads the Perfetto trace that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes
(`dir/plugins/profile/*/perfetto_trace.json.gz`, Chrome's trace-event JSON). For each device it
sums kernel time by kind (collectives, attention, matmuls, the rest), the busy time (the union
of its streams' kernels) and the idle time of its span. `--after NAME` starts the window at the
end of the last kernel whose name holds NAME: `--after ragged_extend` keeps only the decode
steps that follow a prefill.

    python benchmarks/trace_summary.py /tmp/trace --after ragged_extend
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os

KINDS = (  # first match wins; names as NCCL, cuBLAS and our kernels spell them
    ("collective", ("nccl", "all_reduce", "allreduce", "all-reduce", "one_shot")),
    # The Hopper extend kernel is our one Mosaic GPU kernel: its trace name is Mosaic's own.
    ("attention", ("attention", "mosaic_gpu")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "dot")),
    ("copy", ("memcpy", "memset")),
)


def kind(name: str) -> str:
    low = name.lower()
    for label, words in KINDS:
        if any(w in low for w in words):
            return label
    return "other"


def find_trace(path: str) -> str:
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True))
    found += sorted(glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True))
    if not found:
        raise FileNotFoundError(f"no trace under {path}")
    return found[-1]


def device_events(trace: dict) -> dict[str, list[tuple[float, float, str]]]:
    """Kernels of each GPU: {device: [(start µs, end µs, name)]}.

    A device's process also holds derived lines (XLA ops and modules spanning many kernels);
    where it has stream lines ("Stream #…"), only those count.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = str(e["args"]["name"])
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = str(e["args"]["name"])
    gpus = {pid for pid, name in procs.items() if "gpu" in name.lower()}
    streams = {key for key, name in threads.items() if key[0] in gpus and "stream" in name.lower()}
    out = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or e.get("pid") not in gpus:
            continue
        has_streams = any(key[0] == e["pid"] for key in streams)
        if has_streams and (e["pid"], e.get("tid")) not in streams:
            continue
        start = float(e["ts"])
        out[procs[e["pid"]]].append((start, start + float(e["dur"]), e.get("name", "")))
    return out


def busy_us(spans: list[tuple[float, float, str]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e, _ in sorted(spans):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events: dict[str, list], after: str | None) -> list[dict]:
    start = None
    if after:
        ends = [e for spans in events.values() for _, e, n in spans if after in n]
        start = max(ends) if ends else None
    rows = []
    for device, spans in sorted(events.items()):
        if start is not None:
            spans = [sp for sp in spans if sp[0] >= start]
        if not spans:
            continue
        by_kind = collections.Counter()
        count = collections.Counter()
        for s, e, n in spans:
            by_kind[kind(n)] += e - s
            count[kind(n)] += 1
        span = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
        busy = busy_us(spans)
        rows.append(
            dict(
                device=device,
                span_ms=span / 1e3,
                busy_ms=busy / 1e3,
                idle_ms=(span - busy) / 1e3,
                **{f"{k}_ms": by_kind[k] / 1e3 for k, _ in (*KINDS, ("other", ()))},
                collectives=count["collective"],
                top=_top(spans),
            )  # fmt: skip
        )
    return rows


def _top(spans, n: int = 8) -> list[tuple[str, float, int]]:
    t, c = collections.Counter(), collections.Counter()
    for s, e, name in spans:
        t[name[:70]] += e - s
        c[name[:70]] += 1
    return [(name, t[name] / 1e3, c[name]) for name, _ in t.most_common(n)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", help="a trace file or the folder jax.profiler.trace wrote")
    p.add_argument("--after", default=None, help="start after the last kernel holding NAME")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    path = find_trace(args.trace)
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        rows = summarize(device_events(json.load(f)), args.after)
    cols = ("span", "busy", "idle", "collective", "attention", "matmul", "copy", "other")
    print(f"{'device':28} " + " ".join(f"{c:>10}" for c in cols) + "  (ms)   collectives")
    for r in rows:
        vals = " ".join(f"{r[c + '_ms']:10.2f}" for c in cols)
        print(f"{r['device'][-28:]:28} {vals}  {r['collectives']:6d}")
    for r in rows:
        print(f"-- {r['device']}: longest kernels (ms, count)")
        for name, ms, c in r["top"]:
            print(f"   {ms:8.2f} {c:6d}  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
