"""The notebook pipeline: paired sources in sync, no committed outputs, exercises behave."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAIRED = sorted(p for d in ("chapters", "solutions") for p in (ROOT / d).glob("*.py") if not p.name.startswith("_"))
NOTEBOOKS = sorted(p for d in ("chapters", "solutions", "exercises") for p in (ROOT / d).glob("*.ipynb"))


def _cells(nb):
    keep = ("tags", "nbgrader", "boltzlab")
    return [
        (c.cell_type, c.source.strip(), {k: c.metadata[k] for k in keep if k in c.metadata})
        for c in nb.cells
    ]


def test_there_is_a_course():
    assert (ROOT / "chapters" / "00_boltzmann_mcmc.py").exists()
    assert PAIRED and NOTEBOOKS


@pytest.mark.parametrize("py", PAIRED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_pair_in_sync(py: Path):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{py} has no paired notebook: run `make sync`"
    text = jupytext.read(py)
    nb = nbformat.read(ipynb, as_version=4)
    a, b = _cells(text), _cells(nb)
    assert len(a) == len(b), f"{py.name}: {len(a)} cells in .py, {len(b)} in .ipynb: run `make sync`"
    for k, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"{py.name} cell {k} differs between .py and .ipynb: run `make sync`"


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_notebooks_have_no_outputs(ipynb: Path):
    nb = nbformat.read(ipynb, as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} cell {k} has outputs"


def test_jupyterlab_opens_py_as_notebooks():
    import json

    settings = json.loads((ROOT / ".jupyter" / "overrides.json").read_text())
    viewers = settings["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers["python"] == "Jupytext Notebook"
