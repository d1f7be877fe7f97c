"""Every notebook runs top to bottom on a small three-stage run the tests train."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_tiny_run(path, tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("KKLAB_CKPTS", str(tiny_run))
    monkeypatch.setenv("KKLAB_RUN", "tiny")
    monkeypatch.setenv("KKLAB_ANALYSIS_CACHE", str(tiny_run.parent / "analysis-cache"))
    monkeypatch.setenv("KKLAB_QUICK", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    # Something was drawn: every notebook shows at least one figure.
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, path.name
