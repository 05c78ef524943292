"""The grading command: full, zero and partial marks; broken and hostile submissions
cost only their own points."""

from __future__ import annotations

import csv
from pathlib import Path

import nbformat
import pytest

from boltzlab import exercises as ex
from boltzlab.grading import grader
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted, call_learner, expect_close, expect_shape

import torch

CHECK = "from boltzlab.grading.feedback import call_learner, expect_close\n"


def _solutions(tmp: Path) -> Path:
    cells = [
        nbformat.v4.new_markdown_cell("# Toy assignment"),
        nbformat.v4.new_code_cell(
            "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION\n",
            metadata={"nbgrader": {"grade": False, "grade_id": "add_sol", "solution": True}}),
        nbformat.v4.new_code_cell(
            CHECK + "expect_close('add(2, 3)', call_learner(add, 2, 3), 5)\nprint('add ok')\n"
            "### BEGIN HIDDEN TESTS\nassert add(-1, 1) == 0\n### END HIDDEN TESTS\n",
            metadata={"nbgrader": {"grade": True, "grade_id": "add", "points": 1}}),
        nbformat.v4.new_code_cell(
            "def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION\n",
            metadata={"nbgrader": {"grade": False, "grade_id": "square_sol", "solution": True}}),
        nbformat.v4.new_code_cell(
            CHECK + "expect_close('square(3)', call_learner(square, 3), 9)\n",
            metadata={"nbgrader": {"grade": True, "grade_id": "square_small", "points": 1},
                      "boltzlab": {"exercise": "square"}}),
        nbformat.v4.new_code_cell(
            "### BEGIN HIDDEN TESTS\nassert square(-4) == 16\n### END HIDDEN TESTS\n",
            metadata={"nbgrader": {"grade": True, "grade_id": "square_hidden", "points": 2},
                      "boltzlab": {"exercise": "square"}}),
    ]
    sols = tmp / "solutions"
    sols.mkdir()
    nbformat.write(nbformat.v4.new_notebook(cells=cells), sols / "01_toy.ipynb")
    return sols


def _with(nb, **replace_code):
    """Copy of ``nb`` whose solution cells (by grade_id) get new source."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in replace_code:
            cell.source = replace_code[gid]
    return nb


@pytest.mark.slow
def test_grade_folder(tmp_path):
    sols = _solutions(tmp_path)
    exs = tmp_path / "exercises"
    ex.build_all(sols, exs)
    blank = nbformat.read(exs / "01_toy.ipynb", as_version=4)
    solved_add = "def add(a, b):\n    return a + b\n"
    solved_sq = "def square(x):\n    return x ** 2\n"
    subs = tmp_path / "subs"
    subs.mkdir()
    write = lambda name, nb: nbformat.write(nb, subs / name)  # noqa: E731
    write("alice.ipynb", _with(blank, add_sol=solved_add, square_sol=solved_sq))
    write("bob.ipynb", blank)
    write("carol.ipynb", _with(blank, add_sol=solved_add))
    # wrong in a way only the hidden test sees
    write("dan.ipynb", _with(blank, add_sol=solved_add, square_sol="def square(x):\n    return abs(x) * x if x > 0 else 9\n"))
    # tampering with the visible test does not help
    tampered = _with(blank, add_sol="def add(a, b):\n    return 0\n", add="pass\n")
    write("erin.ipynb", tampered)
    # a learner cell that raises (after defining add): later cells still run and score
    write("frank.ipynb", _with(blank, add_sol=solved_add + "raise RuntimeError('boom')\n", square_sol=solved_sq))
    # hangs after solving add: keeps add's point, loses the rest
    write("gina.ipynb", _with(blank, add_sol=solved_add, square_sol="import time\nwhile True:\n    time.sleep(0.1)\n"))
    # deletes everything in its working directory and tries to escape upward
    hostile = ("import os, shutil\nfor f in os.listdir('.'):\n    shutil.rmtree(f, ignore_errors=True) if os.path.isdir(f) else os.remove(f)\n"
               "for f in os.listdir('..'):\n    p = os.path.join('..', f)\n    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)\n" + solved_add)
    write("hank.ipynb", _with(blank, add_sol=hostile, square_sol=solved_sq))
    (subs / "ivan.ipynb").write_text("{ this is not json")
    nested = subs / "jane"
    nested.mkdir()
    nbformat.write(_with(blank, square_sol=solved_sq), nested / "01_toy.ipynb")

    out = tmp_path / "scores.csv"
    results = grader.grade_folder(subs, sols, out, timeout=40, feedback_dir=tmp_path / "fb", progress=False)
    rows = {r["submission"]: r for r in csv.DictReader(out.open())}
    assert len(results) == len(rows) == 10
    pts = lambda who: (float(rows[who]["add"] or 0), float(rows[who]["square"] or 0), float(rows[who]["total"] or 0))  # noqa: E731
    assert pts("alice.ipynb") == (1, 3, 4) and rows["alice.ipynb"]["max_total"] == "4"
    assert pts("bob.ipynb") == (0, 0, 0)
    assert pts("carol.ipynb") == (1, 0, 1)
    assert pts("dan.ipynb") == (1, 1, 2)
    assert pts("erin.ipynb") == (0, 0, 0)
    assert pts("frank.ipynb") == (1, 3, 4)
    assert pts("gina.ipynb") == (1, 0, 1) and rows["gina.ipynb"]["status"].startswith("timeout")
    assert pts("hank.ipynb") == (1, 3, 4)
    assert rows["ivan.ipynb"]["status"].startswith("invalid notebook") and rows["ivan.ipynb"]["total"] == "0"
    assert pts("jane/01_toy.ipynb") == (0, 3, 3)
    assert all(rows[k]["status"] == "ok" for k in rows if k not in ("gina.ipynb", "ivan.ipynb"))
    assert (subs / "ivan.ipynb").exists() and sols.joinpath("01_toy.ipynb").exists()
    report = (tmp_path / "fb" / "carol.md").read_text()
    assert "Total: 1 / 4" in report and "ExerciseNotAttempted" in report


def test_feedback_helpers_say_what_is_wrong():
    with pytest.raises(CheckFailed, match=r"shape \(3,\), expected \(3, 2\)"):
        expect_shape("samples", torch.zeros(3), (3, 2))
    with pytest.raises(CheckFailed, match=r"is 4, expected 5 \(off by 1\)"):
        expect_close("add(2, 3)", 4, 5)
    with pytest.raises(CheckFailed, match="worst at flat index 1: got 7, expected 2"):
        expect_close("x", torch.tensor([1.0, 7.0]), torch.tensor([1.0, 2.0]))
    with pytest.raises(CheckFailed, match="NaN or infinite"):
        expect_close("x", torch.tensor([float("nan")]), torch.tensor([1.0]))

    def todo():
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted, match="still raises NotImplementedError"):
        call_learner(todo)
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        call_learner(lambda: 1 / 0, name="f")
