"""Grade a folder of submitted exercise notebooks into a score table.

For each ``*.ipynb`` under the submissions folder (one row per notebook):

1. read it (invalid JSON or not a notebook: reported, zero points);
2. find its assignment (notebook metadata written by ``boltzlab.exercises``, else the file
   name) and restore every graded test cell from ``solutions/`` by its nbgrader
   ``grade_id``, hidden tests included, so tampering with or deleting a test cell cannot
   help (a deleted one is appended at the end); learner cells are kept as submitted;
3. execute it in a fresh kernel inside a sandbox (:mod:`boltzlab.grading.sandbox`): a
   private in-memory home and /tmp, a read-only copy of the installed package made once per
   run, no network, no instructor environment, limits on memory, CPU time, processes,
   file size and output, and a wall-clock limit; every process of the submission is killed
   when it ends. Errors do not stop the run (each test cell is scored on its own); a
   notebook stopped at a limit keeps the points of the tests it passed before;
4. a test cell earns its nbgrader ``points`` when the kernel's ``execute_reply`` for it
   says ``ok`` (:mod:`boltzlab.grading.runner`: the grader reads the kernel's messages
   itself; the kernel has no file to write results into).

The grader's code is imported once, before the first submission, from the instructor's
installation; submissions only ever see their own read-only copy of the package.

The CSV has one row per submission: ``submission, assignment, status``, points per
exercise (cells grouped by ``metadata.boltzlab.exercise``, default the ``grade_id``),
``total`` and ``max_total``. ``--feedback DIR`` also writes a Markdown report per
submission with, per test, the points and what the check said.

Without bubblewrap the command stops with a message saying how to install it; ``--unsafe``
grades without the sandbox (resource limits only), for notebooks you trust.

Usage::

    python -m boltzlab.grading grade SUBMISSIONS_DIR --out scores.csv [--timeout 120]
        [--solutions solutions] [--feedback feedback/] [--memory-gb 6] [--unsafe]
"""

from __future__ import annotations

import argparse
import compileall
import csv
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

import boltzlab
from boltzlab.grading import runner, sandbox
from boltzlab.grading.sandbox import Limits

REPO_ROOT = Path(__file__).resolve().parents[2]
# Run first in every kernel. torch aborts when imported from a deleted working directory,
# so importing it first keeps a notebook that empties its directory from killing its own
# kernel; the guards make the package functions an exercise asks for refuse to serve it.
SETUP_CODE = "import numpy, torch, matplotlib\nfrom boltzlab.grading import write_yourself\nwrite_yourself.install_all()"


@dataclass(frozen=True)
class TestCell:
    """A graded cell of a solution notebook."""

    grade_id: str
    exercise: str
    points: float
    source: str


@dataclass
class Assignment:
    name: str
    notebook: nbformat.NotebookNode
    tests: list[TestCell]

    @property
    def exercises(self) -> list[str]:
        return list(dict.fromkeys(t.exercise for t in self.tests))

    def max_points(self, exercise: str | None = None) -> float:
        return sum(t.points for t in self.tests if exercise is None or t.exercise == exercise)


@dataclass
class TestResult:
    grade_id: str
    points: float
    max_points: float
    message: str


@dataclass
class SubmissionResult:
    submission: str
    assignment: str
    status: str
    tests: list[TestResult] = field(default_factory=list)

    def points_by_exercise(self, assignment: Assignment | None) -> dict[str, float]:
        if assignment is None:
            return {}
        by_id = {r.grade_id: r.points for r in self.tests}
        out: dict[str, float] = {}
        for t in assignment.tests:
            out[t.exercise] = out.get(t.exercise, 0.0) + by_id.get(t.grade_id, 0.0)
        return out


def load_assignments(solutions_dir: Path) -> dict[str, Assignment]:
    """Every solution notebook and its graded cells."""
    found = {}
    for path in sorted(solutions_dir.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        tests = []
        for cell in nb.cells:
            nbg = cell.metadata.get("nbgrader", {})
            if cell.cell_type == "code" and nbg.get("grade"):
                gid = nbg["grade_id"]
                exercise = cell.metadata.get("boltzlab", {}).get("exercise", gid)
                tests.append(TestCell(gid, exercise, float(nbg.get("points", 0)), cell.source))
        if tests:
            found[path.stem] = Assignment(path.stem, nb, tests)
    return found


def identify(nb: nbformat.NotebookNode, path: Path, assignments: dict[str, Assignment]) -> Assignment | None:
    name = nb.metadata.get("boltzlab", {}).get("assignment")
    if name in assignments:
        return assignments[name]
    for key in sorted(assignments, key=len, reverse=True):
        if key in path.stem:
            return assignments[key]
    return None


def prepare(nb: nbformat.NotebookNode, assignment: Assignment) -> nbformat.NotebookNode:
    """The notebook to execute: learner cells as submitted, test cells from the solution."""
    tests = {t.grade_id: t for t in assignment.tests}
    seen = set()
    cells = []
    for cell in nb.cells:
        gid = cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        if cell.get("cell_type") == "code" and gid in tests:
            cell = nbformat.v4.new_code_cell(tests[gid].source, metadata={"nbgrader": {"grade": True, "grade_id": gid}})
            seen.add(gid)
        elif cell.get("cell_type") == "code":
            cell = nbformat.v4.new_code_cell(cell.get("source", ""), metadata={k: v for k, v in cell.get("metadata", {}).items() if k != "nbgrader"})
        else:
            continue
        cells.append(cell)
    for gid, t in tests.items():  # deleted test cells still run, at the end
        if gid not in seen:
            cells.append(nbformat.v4.new_code_cell(t.source, metadata={"nbgrader": {"grade": True, "grade_id": gid}}))
    setup = nbformat.v4.new_code_cell(SETUP_CODE)
    out = nbformat.v4.new_notebook(cells=[setup, *cells])
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return out


def score(assignment: Assignment, prepared: nbformat.NotebookNode, run: runner.NotebookRun) -> list[TestResult]:
    """Points per test from the kernel's replies to the test cells of ``prepared``."""
    first_cell: dict[str, int] = {}
    for index, cell in enumerate(prepared.cells):
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid is not None:
            first_cell.setdefault(gid, index)  # a duplicated test cell: its first run counts
    results = []
    for t in assignment.tests:
        outcome = run.outcomes.get(first_cell.get(t.grade_id, -1))
        if outcome is None:
            results.append(TestResult(t.grade_id, 0.0, t.points, f"not run ({run.status})"))
        elif outcome.status == "ok":
            results.append(TestResult(t.grade_id, t.points, t.points, outcome.text.strip() or "passed"))
        else:
            results.append(TestResult(t.grade_id, 0.0, t.points, outcome.error or f"failed ({outcome.status})"))
    return results


@dataclass(frozen=True)
class RunSettings:
    """How every submission of one grading run is executed."""

    package_root: Path  # folder holding the run's read-only copy of ``boltzlab``
    timeout: float = 120.0
    limits: Limits = field(default_factory=Limits)
    unsafe: bool = False


def grade_one(path: Path, root: Path, assignments: dict[str, Assignment],
              settings: RunSettings) -> tuple[SubmissionResult, Assignment | None]:
    rel = str(path.relative_to(root))
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # any unreadable file is the submission's own problem
        return SubmissionResult(rel, "", f"invalid notebook: {type(err).__name__}: {str(err)[:200]}"), None
    assignment = identify(nb, path, assignments)
    if assignment is None:
        return SubmissionResult(rel, "", "no matching assignment in solutions/"), None
    prepared = prepare(nb, assignment)
    run = runner.run_notebook(prepared, settings.package_root, settings.timeout, settings.limits, settings.unsafe)
    status = run.status if not run.survivors else f"{run.status}; processes left running: {run.survivors}"
    return SubmissionResult(rel, assignment.name, status, score(assignment, prepared, run)), assignment


def copy_package(dest: Path) -> Path:
    """A byte-compiled copy of the installed ``boltzlab`` under ``dest`` (which is returned);
    sandboxes bind it read-only, so no submission can change what a later one imports."""
    source = Path(boltzlab.__file__).resolve().parent
    shutil.copytree(source, dest / "boltzlab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    compileall.compile_dir(dest / "boltzlab", quiet=1)
    for folder in (dest, *(p for p in dest.rglob("*") if p.is_dir())):
        folder.chmod(0o755)  # readable by the sandbox's nobody user; writable by no one inside
    return dest


def grade_folder(submissions: Path, solutions: Path, out_csv: Path, timeout: float = 120.0,
                 feedback_dir: Path | None = None, progress: bool = True, limits: Limits | None = None,
                 unsafe: bool = False) -> list[SubmissionResult]:
    """Grade every notebook under ``submissions``; write ``out_csv`` (and feedback reports).

    Raises :class:`~boltzlab.grading.sandbox.SandboxUnavailable` when submissions cannot be
    sandboxed here, unless ``unsafe``.
    """
    from tqdm.auto import tqdm

    if not submissions.is_dir():
        raise FileNotFoundError(f"submissions folder {submissions} does not exist")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    assignments = load_assignments(solutions)
    if not assignments:
        raise FileNotFoundError(f"no solution notebooks with graded cells in {solutions}")
    problem = None if unsafe else sandbox.sandbox_problem()
    if problem is not None:
        raise sandbox.SandboxUnavailable(f"cannot grade safely: {problem}")
    paths = sorted(p for p in submissions.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    with tempfile.TemporaryDirectory(prefix="boltzlab-package-") as tmp:
        settings = RunSettings(copy_package(Path(tmp)), timeout, limits or Limits(), unsafe)
        graded = [grade_one(p, submissions, assignments, settings)
                  for p in tqdm(paths, desc="grading", disable=not progress)]
    exercises = list(dict.fromkeys(e for a in assignments.values() for e in a.exercises))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["submission", "assignment", "status", *exercises, "total", "max_total"])
        for res, a in graded:
            pts = res.points_by_exercise(a)
            row = [res.submission, res.assignment, res.status]
            row += [f"{pts[e]:g}" if e in pts else "" for e in exercises]
            row += [f"{sum(pts.values()):g}", f"{a.max_points():g}" if a else ""]
            w.writerow(row)
    if feedback_dir is not None:
        write_feedback(graded, feedback_dir)
    return [r for r, _ in graded]


def write_feedback(graded: list[tuple[SubmissionResult, Assignment | None]], feedback_dir: Path) -> None:
    """One Markdown report per submission: per exercise, points and what each check said."""
    feedback_dir.mkdir(parents=True, exist_ok=True)
    for res, a in graded:
        lines = [f"# Feedback: {res.submission}", "", f"Assignment: {res.assignment or '?'}  ", f"Status: {res.status}", ""]
        if a is not None:
            pts = res.points_by_exercise(a)
            lines.append(f"**Total: {sum(pts.values()):g} / {a.max_points():g}**")
            for ex in a.exercises:
                lines += ["", f"## {ex}: {pts.get(ex, 0):g} / {a.max_points(ex):g}"]
                ids = {t.grade_id for t in a.tests if t.exercise == ex}
                for t in res.tests:
                    if t.grade_id in ids:
                        mark = "passed" if t.points == t.max_points else "not passed"
                        lines += [f"- `{t.grade_id}` ({t.points:g}/{t.max_points:g}, {mark}):", "", "  ```", *("  " + m for m in t.message.splitlines()[-12:]), "  ```"]
        name = res.submission.replace(os.sep, "__").removesuffix(".ipynb") + ".md"
        (feedback_dir / name).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m boltzlab.grading", description="Grade submitted exercise notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a folder of submissions into a CSV")
    g.add_argument("submissions", type=Path)
    g.add_argument("--out", type=Path, default=Path("scores.csv"))
    g.add_argument("--solutions", type=Path, default=REPO_ROOT / "solutions")
    g.add_argument("--timeout", type=float, default=120.0, help="wall-clock seconds per notebook")
    g.add_argument("--feedback", type=Path, default=None, help="folder for one Markdown report per submission")
    g.add_argument("--memory-gb", type=float, default=Limits.memory_bytes / 2**30,
                   help="address-space limit per notebook, GiB")
    g.add_argument("--unsafe", action="store_true",
                   help="grade without the sandbox (only resource limits): for notebooks you trust")
    g.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.memory_gb <= 0:
        parser.error(f"--memory-gb must be positive, got {args.memory_gb}")
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout}")
    limits = Limits(memory_bytes=int(args.memory_gb * 2**30))
    t0 = time.perf_counter()
    try:
        results = grade_folder(args.submissions, args.solutions, args.out, args.timeout, args.feedback,
                               not args.no_progress, limits, args.unsafe)
    except (sandbox.SandboxUnavailable, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad = sum(r.status != "ok" for r in results)
    print(f"graded {len(results)} submission(s) in {time.perf_counter() - t0:.1f} s "
          f"({bad} with problems); scores in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
