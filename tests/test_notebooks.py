"""Each notebook in notebooks/ is stored with its outputs (readable on GitHub without running it) and
runs top to bottom with the tiny models."""

import asyncio
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"degradation_explorer", "method_walkthrough", "sweep_analysis"}


def displays(notebook) -> bool:
    return any(
        output.get("output_type") == "display_data"
        for cell in notebook.cells
        for output in cell.get("outputs", [])
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_with_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code), "store the notebook executed (every cell)"
    assert not any(o.get("output_type") == "error" for cell in code for o in cell.get("outputs", []))
    assert displays(notebook)


def test_every_notebook_runs_afresh(tmp_path):
    """All notebooks at once, each in its own kernel (a process: on another core where there is one), on
    one thread each, each kernel in its own folder."""
    clients = {}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        folder = tmp_path / path.stem
        folder.mkdir()
        clients[path.stem] = NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
        )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    async def run_all() -> list:
        runs = (client.async_execute(env=env) for client in clients.values())
        return await asyncio.gather(*runs, return_exceptions=True)

    for (name, client), result in zip(clients.items(), asyncio.run(run_all())):
        if isinstance(result, BaseException):
            pytest.fail(f"{name}.ipynb failed: {result}")
        assert displays(client.nb), name
