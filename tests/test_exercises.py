"""exercises/ is generated from solutions/: regions stripped, tags set, nothing leaks."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from boltzlab import exercises as ex

ROOT = Path(__file__).resolve().parents[1]
NOT_ATTEMPTED = {"NotImplementedError", "ExerciseNotAttempted"}


def _solution_nb() -> nbformat.NotebookNode:
    sol = nbformat.v4.new_code_cell(
        "def f(x):\n    '''doubles'''\n    ### BEGIN SOLUTION\n    y = 2 * x\n    return y\n    ### END SOLUTION\n",
        metadata={"nbgrader": {"grade": False, "grade_id": "f_sol", "solution": True}},
    )
    top = nbformat.v4.new_code_cell("### BEGIN SOLUTION\nanswer_value = 42\n### END SOLUTION\n")
    test = nbformat.v4.new_code_cell(
        "assert f(1) == 2\n### BEGIN HIDDEN TESTS\nassert f(21) == answer_value\n### END HIDDEN TESTS\n",
        metadata={"nbgrader": {"grade": True, "grade_id": "f", "points": 1}},
    )
    md = nbformat.v4.new_markdown_cell("Why?\n### BEGIN SOLUTION\nBecause of detailed balance.\n### END SOLUTION")
    return nbformat.v4.new_notebook(cells=[sol, top, test, md])


def test_regions_are_replaced_and_cells_tagged():
    nb, secret = ex.build_exercise(_solution_nb(), "toy")
    sol, top, test, md = nb.cells
    assert "raise NotImplementedError()" in sol.source and "2 * x" not in sol.source
    assert sol.source.splitlines()[-1] == "    raise NotImplementedError()"  # indentation kept
    assert "raises-exception" not in sol.metadata.get("tags", [])  # defines f; only calling it raises
    assert top.source == "raise NotImplementedError()" and "raises-exception" in top.metadata["tags"]
    assert "HIDDEN" not in test.source and "answer_value" not in test.source
    assert test.source == "assert f(1) == 2" and "raises-exception" in test.metadata["tags"]
    assert md.source.endswith("*Your answer here.*") and "detailed balance" not in md.source
    assert ["    y = 2 * x", "    return y"] in secret and ["assert f(21) == answer_value"] in secret
    assert nb.metadata["boltzlab"]["assignment"] == "toy"


@pytest.mark.parametrize("bad", [
    "### BEGIN SOLUTION\nx = 1\n",
    "x = 1\n### END SOLUTION\n",
    "### BEGIN SOLUTION\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n### END SOLUTION\n",
])
def test_unbalanced_markers_are_errors(bad):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(bad)])
    with pytest.raises(ex.ExerciseFormatError):
        ex.build_exercise(nb, "bad")


def test_check_detects_stale_and_leaky(tmp_path):
    sols, exs = tmp_path / "solutions", tmp_path / "exercises"
    sols.mkdir()
    nbformat.write(_solution_nb(), sols / "01_toy.ipynb")
    assert ex.check_all(sols, exs) and "missing" in ex.check_all(sols, exs)[0]
    ex.build_all(sols, exs)
    assert ex.check_all(sols, exs) == []
    leaked = nbformat.read(exs / "01_toy.ipynb", as_version=4)
    leaked.cells[0].source += "\n    y = 2 * x\n    return y"
    nbformat.write(leaked, exs / "01_toy.ipynb")
    problems = ex.check_all(sols, exs)
    assert any("stale" in p for p in problems) and any("leaks solution text" in p for p in problems)


def test_committed_exercises_are_up_to_date():
    problems = ex.check_all(ROOT / "solutions", ROOT / "exercises")
    assert problems == [], "\n".join(problems)
    assert ex.solution_notebooks(ROOT / "solutions"), "no exercises yet"


@pytest.mark.parametrize("path", sorted((ROOT / "exercises").glob("*.ipynb")), ids=lambda p: p.name)
def test_untouched_exercise_raises_only_not_implemented(path: Path, monkeypatch):
    """Run the untouched exercise: exactly the tagged cells raise, and only NotImplementedError."""
    monkeypatch.setenv("BOLTZLAB_BUDGET", "smoke")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    tagged = 0
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        errors = [o for o in cell.outputs if o.output_type == "error"]
        expects = "raises-exception" in cell.metadata.get("tags", [])
        tagged += expects
        if expects:
            assert errors, f"cell {k} is tagged raises-exception but ran: {cell.source[:80]!r}"
            assert errors[0].ename in NOT_ATTEMPTED, f"cell {k} raised {errors[0].ename}: {errors[0].evalue}"
        else:
            assert not errors, f"cell {k} raised {errors[0].ename}: {errors[0].evalue}"
    assert tagged >= 1, "an exercise notebook with nothing to do"


def test_student_release_has_no_solutions(tmp_path):
    out = tmp_path / "release"
    files = ex.build_release(out)
    assert not (out / "solutions").exists() and not (out / "tests").exists()
    assert (out / "exercises" / "00_mcmc.ipynb").exists() and (out / "chapters" / "00_boltzmann_mcmc.py").exists()
    assert len(files) == sum(1 for p in out.rglob("*") if p.is_file())
    assert ex.find_leaks(out, ROOT / "solutions") == []
    # the search finds a solution pasted anywhere in the release, and markers in notebooks
    sol = nbformat.read(ROOT / "solutions" / "00_mcmc.ipynb", as_version=4)
    code = next(c.source for c in sol.cells if "BEGIN SOLUTION" in c.source)
    (out / "boltzlab" / "cheat.py").write_text(code)
    leaks = ex.find_leaks(out, ROOT / "solutions")
    assert any(p.startswith("boltzlab/cheat.py") for p in leaks)
