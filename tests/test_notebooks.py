"""The notebooks under notebooks/ run clean, top to bottom, on the embedded model (nbclient)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_clean(path: Path):
    nb = nbformat.read(path, as_version=4)
    # The kernel imports this checkout, on the CPU, without the suite's fake devices; its
    # kernel spec runs `python`: this interpreter, even from a venv that is not activated.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "PATH": path}
    client = NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    client.execute(env=env)  # raises CellExecutionError on the first failing cell
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
