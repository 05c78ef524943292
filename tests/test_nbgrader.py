"""nbgrader interoperability (optional: nbgrader pins JupyterLab < 5, so it lives in an
environment of its own). ``nbgrader generate_assignment`` and ``nbgrader autograde`` run on
``solutions/`` as they are, and honest submissions get the same points from nbgrader as from
``python -m boltzlab.grading``.

Point ``BOLTZLAB_NBGRADER`` at that environment's ``nbgrader`` executable (or put it on
PATH); its Python must import ``boltzlab`` (``pip install -e .`` there). Skipped otherwise.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from boltzlab import exercises as ex
from boltzlab.grading import grader, sandbox
from test_instructor_flow import _solve

ROOT = Path(__file__).resolve().parents[1]
NBGRADER = os.environ.get("BOLTZLAB_NBGRADER") or shutil.which("nbgrader")
ASSIGNMENT = "00_mcmc"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NBGRADER is None, reason="nbgrader is not installed (optional; see the README, "
                                                 "section 'Grading with nbgrader')"),
]


def _nbgrader(course: Path, *args: str) -> subprocess.CompletedProcess:
    """Run nbgrader in ``course`` with its environment's bin first on PATH (it calls alembic)."""
    env = {**os.environ, "PATH": f"{Path(NBGRADER).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([NBGRADER, *args], cwd=course, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _nbgrader_python() -> str:
    return str(Path(NBGRADER).resolve().parent / "python")


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    if subprocess.run([_nbgrader_python(), "-c", "import boltzlab, torch"], capture_output=True).returncode != 0:
        pytest.skip("nbgrader's Python cannot import boltzlab: `pip install -e .` in nbgrader's environment")
    course = tmp_path_factory.mktemp("nbgrader_course")
    (course / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.course_id = 'boltzlab'\nc.CourseDirectory.root = {str(course)!r}\n")
    every = course / "source" / "all"
    every.mkdir(parents=True)
    for path in ex.solution_notebooks(ROOT / "solutions"):
        shutil.copy(path, every / path.name)
    (course / "source" / ASSIGNMENT).mkdir()
    shutil.copy(ROOT / "solutions" / f"{ASSIGNMENT}.ipynb", course / "source" / ASSIGNMENT)
    return course


def test_generate_assignment_on_solutions_as_they_are(course):
    _nbgrader(course, "generate_assignment", "all", "--force")
    released = sorted(p.name for p in (course / "release" / "all").glob("*.ipynb"))
    assert released == sorted(p.name for p in ex.solution_notebooks(ROOT / "solutions"))
    assert ex.find_leaks(course / "release" / "all", ROOT / "solutions") == []


def _nbgrader_points(course: Path, students: list[str]) -> dict[str, dict[str, float]]:
    script = (
        "import json, sys\nfrom nbgrader.api import Gradebook\n"
        f"with Gradebook('sqlite:///{course}/gradebook.db') as gb:\n"
        f"    print(json.dumps({{s: {{g.name: g.score for nb in gb.find_submission('{ASSIGNMENT}', s).notebooks "
        f"for g in nb.grades}} for s in {students!r}}}))\n")
    out = subprocess.run([_nbgrader_python(), "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(sandbox.sandbox_problem() is not None, reason="the boltzlab grader needs its sandbox")
def test_honest_submissions_score_the_same_in_both_graders(course, tmp_path):
    _nbgrader(course, "generate_assignment", ASSIGNMENT, "--force")
    handed_out = nbformat.read(course / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    solved = _solve(handed_out, nbformat.read(ROOT / "solutions" / f"{ASSIGNMENT}.ipynb", as_version=4))
    half = nbformat.from_dict(solved)  # mala_step answered, kish_ess left as handed out
    for cell, blank in zip(half.cells, handed_out.cells):
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "kish_ess_solution":
            cell.source = blank.source
    students = {"ada": solved, "bo": handed_out, "cy": half}
    ours = tmp_path / "submissions"
    for name, nb in students.items():
        (course / "submitted" / name / ASSIGNMENT).mkdir(parents=True)
        nbformat.write(nb, course / "submitted" / name / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
        (ours / name).mkdir(parents=True)
        nbformat.write(nb, ours / name / f"{ASSIGNMENT}.ipynb")
    _nbgrader(course, "autograde", ASSIGNMENT, "--force")
    theirs = _nbgrader_points(course, sorted(students))
    grader.grade_folder(ours, ROOT / "solutions", tmp_path / "scores.csv", timeout=180, progress=False)
    rows = {r["submission"].split("/")[0]: r for r in csv.DictReader((tmp_path / "scores.csv").open())}
    for name in students:
        assert {test: float(rows[name][test]) for test in theirs[name]} == theirs[name], name
    assert theirs["ada"] == {"mala_step": 3.0, "kish_ess": 2.0} and theirs["cy"] == {"mala_step": 3.0, "kish_ess": 0.0}
