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


# Calls whose return value a notebook would display as noise when they end a cell:
# torch.manual_seed -> <torch._C.Generator ...>, matplotlib setters -> Text(...), and the
# plot helpers of boltzlab.plots -> <Axes: ...>.
NOISY_LAST_CALLS = {
    "manual_seed", "set_title", "set_xlabel", "set_ylabel", "set_xlim", "set_ylim", "set", "legend", "plot",
    "scatter", "hist", "imshow", "colorbar", "axhline", "axvline", "suptitle", "text", "annotate", "loglog",
    "semilogx", "semilogy", "density_2d", "samples_2d", "energy_histogram", "distance_histogram_plot", "trace_plot",
    "training_curve", "evaluation_curves", "reward_kl_tradeoff", "panel_grid", "set_torch_threads",
}


def _noisy_last_call(source: str) -> str | None:
    import ast

    lines = [line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))]
    try:
        body = ast.parse("\n".join(lines)).body
    except SyntaxError:
        return None
    if not body or not isinstance(body[-1], ast.Expr) or not isinstance(body[-1].value, ast.Call):
        return None
    func = body[-1].value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name if name in NOISY_LAST_CALLS else None


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_cell_ends_in_a_call_that_displays_noise(ipynb: Path):
    nb = nbformat.read(ipynb, as_version=4)
    noisy = [(k, name) for k, c in enumerate(nb.cells) if c.cell_type == "code"
             for name in [_noisy_last_call(c.source)] if name]
    assert not noisy, f"{ipynb.name}: cells ending in a call whose value would be displayed: {noisy}"


def test_the_noise_check_sees_a_bare_manual_seed():
    assert _noisy_last_call("import torch\ntorch.manual_seed(0)") == "manual_seed"
    assert _noisy_last_call("_ = torch.manual_seed(0)") is None
    assert _noisy_last_call("ax.set_title('x')\nplt.show()") is None


@pytest.mark.parametrize("ipynb", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebooks_carry_the_language_info_jupyterlab_adds(ipynb: Path):
    """JupyterLab writes the kernel's language_info into a notebook it opens; a notebook that
    lacks it (or has another) opens marked modified. The fields must be the kernel's; the
    Python version must match in major.minor here (the browser tour checks the full version
    against the kernel CI runs: on a mismatch, `make sync` and `make exercises` restamp)."""
    from boltzlab.notebooks import kernel_language_info

    info = nbformat.read(ipynb, as_version=4).metadata.get("language_info")
    assert info, f"{ipynb.name} has no language_info: run `make sync` (or `make exercises`)"
    expected = kernel_language_info()
    assert {k: v for k, v in info.items() if k != "version"} == {k: v for k, v in expected.items() if k != "version"}
    assert info["version"].split(".")[:2] == expected["version"].split(".")[:2]


def test_jupytext_sync_keeps_the_language_info(tmp_path):
    """`make sync` rewrites an .ipynb from its edited .py: the stamp must survive it."""
    import shutil
    import subprocess
    import sys
    import time

    shutil.copy(ROOT / "jupytext.toml", tmp_path)
    source = ROOT / "chapters" / "00_boltzmann_mcmc"
    shutil.copy(source.with_suffix(".ipynb"), tmp_path / "nb.ipynb")
    shutil.copy(source.with_suffix(".py"), tmp_path / "nb.py")
    time.sleep(1.0)  # the .py must be the newer side
    with open(tmp_path / "nb.py", "a") as f:
        f.write("\n# %%\nx = 1\n")
    jupytext = Path(sys.executable).with_name("jupytext")
    subprocess.run([str(jupytext), "--sync", "nb.py"], cwd=tmp_path, check=True, capture_output=True)
    nb = nbformat.read(tmp_path / "nb.ipynb", as_version=4)
    assert nb.cells[-1].source == "x = 1"
    assert nb.metadata["language_info"] == nbformat.read(source.with_suffix(".ipynb"), as_version=4).metadata["language_info"]
