"""Two processes × two fake CPU devices, one tensor-parallel mesh over both (jax.distributed on
loopback): the leader serves HTTP and every step runs on both; greedy outputs equal one
process's, and SIGTERM to the leader stops both processes cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from server_fixture import free_port

from jaxsgl.generator import Generator

ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "benchmarks" / "configs" / "tiny-gqa4")  # 8 q / 2 kv heads, 4 layers
FLAGS = (
    "--model-path", MODEL, "--load-format", "dummy", "--dtype", "float32", "--tp-size", "4",
    "--max-total-tokens", "4096", "--context-length", "512", "--skip-server-warmup",
    "--num-continuous-decode-steps", "4",
)  # fmt: skip
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [300, 301, 302]]
PARAMS = [
    {"temperature": 0.0, "max_new_tokens": 10},
    {"temperature": 1.0, "max_new_tokens": 7, "sampling_seed": 3},
]


def _start(rank: int, coordinator: str, http_port: int, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "-m", "jaxsgl.launch_server", *FLAGS, "--nnodes", "2"]
    cmd += ["--node-rank", str(rank), "--dist-init-addr", coordinator]
    cmd += ["--host", "127.0.0.1", "--port", str(http_port)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _post(url: str, body: dict) -> list[dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def _wait_healthy(url: str, procs, deadline: float) -> None:
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"a process exited with {p.returncode}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the leader never became healthy")


def test_two_processes_serve_what_one_process_serves():
    coordinator, port = f"127.0.0.1:{free_port()}", free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        follower = _start(1, coordinator, port, log)
        leader = _start(0, coordinator, port, log)
        try:
            _wait_healthy(url, (leader, follower), time.monotonic() + 240)
            body = {"input_ids": PROMPTS, "sampling_params": PARAMS}
            served = [r["output_ids"] for r in _post(url + "/generate", body)]
            leader.send_signal(signal.SIGTERM)
            assert leader.wait(timeout=60) == 0
            assert follower.wait(timeout=60) == 0  # told to stop, not orphaned
        except BaseException:
            for p in (leader, follower):
                p.kill()
            log.seek(0)
            print(log.read().decode(errors="replace")[-6000:])
            raise
    with Generator(
        MODEL, load_format="dummy", dtype="float32", tp_size=4, max_total_tokens=4096,
        context_length=512, warmup=False, progress=False,
    ) as one:  # fmt: skip
        expected = [
            r["output_ids"] for r in one.generate(input_ids=PROMPTS, sampling_params=PARAMS)
        ]
    assert served == expected
    assert all(len(ids) == p["max_new_tokens"] for ids, p in zip(served, PARAMS, strict=True))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nnodes", "2"], "dist_init_addr"),
        (["--nnodes", "2", "--node-rank", "2", "--dist-init-addr", "h:1"], "node_rank"),
    ],
)
def test_bad_multi_host_flags_are_refused(flags, message):
    out = subprocess.run(
        [sys.executable, "-m", "jaxsgl.launch_server", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and message in out.stderr
