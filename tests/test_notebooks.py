"""Each notebook in notebooks/ is stored with its outputs (readable on GitHub without running it) and
runs top to bottom with the tiny models."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"degradation_explorer", "method_walkthrough", "sweep_analysis"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_outputs_and_runs(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code), "store the notebook executed (every cell)"
    assert not any(o.get("output_type") == "error" for cell in code for o in cell.get("outputs", []))
    assert any(o.get("output_type") == "display_data" for cell in code for o in cell.get("outputs", []))
    for cell in code:  # run it afresh
        cell.outputs, cell.execution_count = [], None
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert any(
        output.get("output_type") == "display_data"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )
