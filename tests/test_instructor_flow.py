"""The instructor flow end to end, with the course's own chapter 00 exercises: build the
student release, take its exercise notebook as a learner would, and grade a solved and an
untouched copy with the command-line grader into a CSV and feedback reports."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _solve(exercise: nbformat.NotebookNode, solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The learner's copy with each solution cell answered (the instructor's answer, without
    the hidden tests, which the release never had)."""
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in solution.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    solved = nbformat.from_dict(exercise)
    for cell in solved.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell.source = "\n".join(line for line in answers[gid].splitlines()
                                     if line.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION"))
    return solved


@pytest.mark.slow
def test_release_then_grade(tmp_path):
    release = tmp_path / "release"
    subprocess.run([sys.executable, "-m", "boltzlab.exercises", "release", str(release)], check=True, cwd=ROOT)
    handed_out = nbformat.read(release / "exercises" / "00_mcmc.ipynb", as_version=4)
    assert not (release / "solutions").exists()

    subs = tmp_path / "submissions"
    (subs / "ada").mkdir(parents=True)
    (subs / "bo").mkdir()
    (subs / "cy").mkdir()
    solution = nbformat.read(ROOT / "solutions" / "00_mcmc.ipynb", as_version=4)
    nbformat.write(_solve(handed_out, solution), subs / "ada" / "00_mcmc.ipynb")
    nbformat.write(handed_out, subs / "bo" / "00_mcmc.ipynb")
    # cy hands in the package's own kish_ess, imported under another name before the check
    calls_package = _solve(handed_out, solution)
    for cell in calls_package.cells:
        if cell.metadata.get("nbgrader", {}).get("grade_id") == "kish_ess_solution":
            cell.source = ("from boltzlab.metrics import kish_ess as packaged_ess\n\n"
                           "def kish_ess(log_w):\n    return packaged_ess(log_w)\n")
    nbformat.write(calls_package, subs / "cy" / "00_mcmc.ipynb")

    out, feedback = tmp_path / "scores.csv", tmp_path / "feedback"
    subprocess.run([sys.executable, "-m", "boltzlab.grading", "grade", str(subs), "--out", str(out),
                    "--feedback", str(feedback), "--timeout", "180", "--no-progress"], check=True, cwd=ROOT)
    rows = {r["submission"]: r for r in csv.DictReader(out.open())}
    ada, bo, cy = rows["ada/00_mcmc.ipynb"], rows["bo/00_mcmc.ipynb"], rows["cy/00_mcmc.ipynb"]
    assert (ada["mala_step"], ada["kish_ess"], ada["total"], ada["max_total"]) == ("3", "2", "5", "5")
    assert (bo["mala_step"], bo["kish_ess"], bo["total"]) == ("0", "0", "0")
    assert (cy["mala_step"], cy["kish_ess"], cy["total"]) == ("3", "0", "3")
    assert ada["status"] == bo["status"] == cy["status"] == "ok"
    report = (feedback / "bo__00_mcmc.md").read_text()
    assert "Total: 0 / 5" in report and "still raises NotImplementedError" in report
    assert "calls boltzlab.metrics.kish_ess" in (feedback / "cy__00_mcmc.md").read_text()
    assert "write it yourself" in (feedback / "cy__00_mcmc.md").read_text()
