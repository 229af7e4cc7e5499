"""The shipped Grafana dashboard queries only metrics the server really exports."""

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from jaxsgl.generator import Generator
from serving.metrics import Metrics

DASHBOARD = Path(__file__).parents[1] / "serving" / "dashboards" / "grafana.json"
METRIC = re.compile(r"\b(sglang[:_][a-z_]+|request_latency_seconds\w*|active_gpu_memory_bytes)")


def test_dashboard_queries_exported_metrics():
    with Generator(
        dtype="float32", max_total_tokens=1024, context_length=256, warmup=False, progress=False
    ) as gen:
        gen.generate("Hello", {"max_new_tokens": 3})
        metrics = Metrics(gen.engine.metrics, gen.engine.stats.gen_throughput)
        metrics.observe_finished({"e2e_latency": 0.5, "ttft": 0.1, "completion_tokens": 3})
        text = metrics.render().decode()
    samples = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in METRIC.findall(e)}
    assert {"sglang_hit_rate", "request_latency_seconds_bucket", "active_gpu_memory_bytes"} <= used
    missing = sorted(used - samples)
    assert not missing, f"dashboard queries metrics the server does not export: {missing}"
