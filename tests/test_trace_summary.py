"""benchmarks/trace_summary.py on a hand-written trace: busy time is the union of a device's
stream kernels, idle the rest of its span, derived lines are left out, and the window starts
after the last kernel named by `after`."""

import importlib.util
import pathlib

import pytest

spec = importlib.util.spec_from_file_location(
    "trace_summary", pathlib.Path(__file__).parents[1] / "benchmarks" / "trace_summary.py"
)
trace_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_summary)


def meta(pid, name, tid=None):
    if tid is None:
        return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
    return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def kernel(pid, tid, ts, dur, name):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name}


def test_busy_idle_and_kinds():
    trace = {
        "traceEvents": [
            meta(1, "/device:GPU:0"),
            meta(1, "Stream #7(Compute)", tid=7),
            meta(1, "Stream #9(Nccl)", tid=9),
            meta(1, "XLA Ops", tid=2),
            meta(5, "/host:CPU"),
            kernel(1, 7, 0, 100, "ragged_extend_attention"),  # prefill, before the window
            kernel(1, 7, 200, 50, "sm90_xmma_gemm_bf16"),
            kernel(1, 9, 240, 30, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL"),  # overlaps 10
            kernel(1, 7, 300, 20, "paged_decode_attention"),
            kernel(1, 7, 330, 15, "entry_mosaic_gpu_kernel"),  # the Hopper extend kernel
            kernel(1, 7, 400, 10, "loop_add_fusion"),
            kernel(1, 2, 200, 210, "while.3"),  # a derived line spanning the kernels: ignored
            kernel(5, 1, 0, 1000, "python"),  # host: ignored
        ]
    }
    (row,) = trace_summary.summarize(trace_summary.device_events(trace), "ragged_extend")
    assert row["span_ms"] == pytest.approx(0.210)  # 200 .. 410
    assert row["busy_ms"] == pytest.approx((70 + 20 + 15 + 10) / 1e3)
    assert row["idle_ms"] == pytest.approx(0.095)
    assert row["collective_ms"] == pytest.approx(0.030)
    assert row["matmul_ms"] == pytest.approx(0.050)
    assert row["attention_ms"] == pytest.approx(0.035)
    assert row["other_ms"] == pytest.approx(0.010)
    assert row["collectives"] == 1


def test_no_window_keeps_everything():
    trace = [meta(3, "/device:GPU:1"), kernel(3, 1, 10, 5, "a"), kernel(3, 1, 12, 5, "b")]
    (row,) = trace_summary.summarize(trace_summary.device_events(trace), None)
    assert row["busy_ms"] == pytest.approx(0.007)  # 10 .. 17, the overlap counted once
    assert row["other_ms"] == pytest.approx(0.010)
