"""A real jaxsgl server for the end-to-end tests: `python -m jaxsgl.launch_server` on loopback.

Test modules load this as a plugin (`pytest_plugins = ["server_fixture"]`), so the session's
`server` fixture is one process shared by every module that asks for it. The process gets
`JAX_PLATFORMS=cpu` and none of the test process's fake devices; stopping it is a test of its
own: SIGTERM must end it with exit code 0 within a minute.

Test modules import helpers from here before pytest loads it as a plugin, so its asserts are
not rewritten (PYTEST_DONT_REWRITE) and carry their own messages.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxsgl.model.loader import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
MODEL = DEFAULT_MODEL  # the served name without --served-model-name
CONTEXT_LENGTH = 1024
SERVER_FLAGS = (
    "--max-total-tokens", "16384", "--context-length", str(CONTEXT_LENGTH),
    "--max-running-requests", "64", "--chunked-prefill-size", "512",
    "--skip-server-warmup", "--log-level", "warning",
)  # fmt: skip
START_TIMEOUT = 240.0
STOP_TIMEOUT = 60.0


class ServerProcess:
    """One `launch_server` subprocess; `url` is its base URL once `start()` returns."""

    def __init__(self, *extra_flags: str, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = (*extra_flags, "--api-key", api_key) if api_key else extra_flags
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # The server's output, shown when something fails; closed by `run_server`.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        # Where `/start_profile` writes when a request names no folder (removed with the log).
        self.trace_dir = tempfile.TemporaryDirectory()  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["JAX_PLATFORMS"] = "cpu"
        env["JAXSGL_PROFILER_DIR"] = self.trace_dir.name
        cmd = [sys.executable, "-m", "jaxsgl.launch_server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *SERVER_FLAGS, *self.flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            if self.get("/health")[0] == 200:
                return self
            time.sleep(0.5)
        self.proc.kill()
        raise RuntimeError(f"server not healthy after {START_TIMEOUT} s:\n{self.output()}")

    def get(self, path: str, timeout: float = 10.0, **headers: str) -> tuple[int, bytes]:
        """(status, body) of a GET; status 0 when nothing answers."""
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def server_info(self) -> dict:
        status, body = self.get("/server_info", timeout=60, **self.auth)
        assert status == 200, body
        return json.loads(body)

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The `/server_info` that shows nothing running or queued (and clean page accounting);
        fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.server_info()
            idle = info["num_running_reqs"] == 0 and info["num_queue_reqs"] == 0
            if idle and info["integrity"] == {"running": 0, "waiting": 0}:
                return info
            assert time.monotonic() < deadline, f"server still busy after {timeout} s: {info}"
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM; the exit code (the process is killed if it outlives `STOP_TIMEOUT`)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"server ignored SIGTERM for {STOP_TIMEOUT} s:\n{self.output()}"
                ) from None
        return self.proc.returncode

    def output(self, tail: int = 6000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-tail:]


def scrape(server) -> dict[str, list[tuple[dict, float]]]:
    """`/metrics` parsed by prometheus_client: sample name -> [(labels, value)]."""
    status, body = server.get("/metrics")
    assert status == 200, f"/metrics answered {status}: {body[:300]!r}"
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


def value(samples: dict, name: str) -> float:
    """The one value of an unlabelled sample (a histogram's `_count`, not its buckets)."""
    [(labels, v)] = [(labels, v) for labels, v in samples[name] if "le" not in labels]
    return v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(*extra_flags: str, api_key: str | None = None):
    """Fixture body: start a server, yield it, and require a clean SIGTERM exit."""
    server = ServerProcess(*extra_flags, api_key=api_key).start()
    try:
        yield server
        code = server.stop()
        assert code == 0, f"server exited with {code}:\n{server.output()}"
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.log.close()
        server.trace_dir.cleanup()


@pytest.fixture(scope="session")
def server():
    """The shared server with the default model (SmolLM2) and the suite's flags."""
    yield from run_server()


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.url
