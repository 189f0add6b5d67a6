"""Execute every tutorial notebook in fast mode (``PPL_FAST=1`` shrinks the runs)."""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_is_a_tutorial_notebook():
    assert any(p.name == "01_programmable_vi.ipynb" for p in NOTEBOOKS)


# The core tutorial runs in the default suite; the five family tutorials (30-90 s each on
# 2 cores) run with -m slow, keeping the default suite under 15 minutes.
CASES = [
    pytest.param(p, marks=() if p.name.startswith("01_") else pytest.mark.slow, id=p.name)
    for p in NOTEBOOKS
]


@pytest.mark.parametrize("path", CASES)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("PPL_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
    nb = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(path.parent)}}
    NotebookClient(nb, timeout=900, kernel_name="python3", resources=resources).execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
