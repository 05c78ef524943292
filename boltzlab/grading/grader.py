"""Grade a folder of submitted exercise notebooks into a score table.

For each ``*.ipynb`` under the submissions folder (one row per notebook):

1. read it (invalid JSON or not a notebook: reported, zero points);
2. find its assignment (notebook metadata written by ``boltzlab.exercises``, else the file
   name) and restore every graded test cell from ``solutions/`` by its nbgrader
   ``grade_id``, hidden tests included, so tampering with or deleting a test cell cannot
   help; learner cells are kept as submitted;
3. execute it in a fresh kernel, in a throw-away copy of its own working directory with
   ``HOME`` pointing there, under ``BOLTZLAB_BUDGET=smoke``, with a wall-clock limit;
   errors do not stop the run (each test cell is scored on its own); a notebook that hangs
   is killed, kernel and children included, and keeps the points of the tests it passed
   before it hung;
4. a test cell earns its nbgrader ``points`` when it runs without error.

The CSV has one row per submission: ``submission, assignment, status``, points per
exercise (cells grouped by ``metadata.boltzlab.exercise``, default the ``grade_id``),
``total`` and ``max_total``. ``--feedback DIR`` also writes a Markdown report per
submission with, per test, the points and what the check said.

Usage::

    python -m boltzlab.grading grade SUBMISSIONS_DIR --out scores.csv [--timeout 120]
        [--solutions solutions] [--feedback feedback/]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN_VAR = "BOLTZLAB_GRADING_TOKEN"


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
    # torch aborts when imported from a deleted working directory; importing it first
    # keeps a notebook that empties its directory from killing its own kernel.
    setup = nbformat.v4.new_code_cell("import numpy, torch, matplotlib\nimport boltzlab.grading.feedback")
    out = nbformat.v4.new_notebook(cells=[setup, *cells])
    out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return out


def _kill_tree(proc: subprocess.Popen, token: str) -> None:
    """Kill the runner's process group and every process that carries the grading token
    (the kernel runs in a session of its own, and a hostile notebook may fork)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    needle = f"{TOKEN_VAR}={token}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue
    proc.wait()


def run_notebook(nb: nbformat.NotebookNode, timeout: float) -> tuple[list[dict], str]:
    """Execute ``nb`` in a fresh directory; returns (per-test records, status)."""
    token = uuid.uuid4().hex
    # The notebook's directory and the grader's own files (results, kernel connection
    # file) live in separate temporary trees, so a notebook that empties its working
    # directory and its parent neither kills its kernel nor erases its results.
    with tempfile.TemporaryDirectory(prefix="boltzlab-grade-") as tmp, \
            tempfile.TemporaryDirectory(prefix="boltzlab-grader-") as private:
        work = Path(tmp) / "work"
        work.mkdir()
        nb_path = work / "submission.ipynb"
        nbformat.write(nb, nb_path)
        results_path = Path(private) / "results.jsonl"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JPY_")}
        env.update({TOKEN_VAR: token, "BOLTZLAB_BUDGET": "smoke", "MPLBACKEND": "Agg",
                    "JUPYTER_RUNTIME_DIR": str(Path(private) / "runtime"),
                    "IPYTHONDIR": str(Path(private) / "ipython"), "MPLCONFIGDIR": str(Path(private) / "mpl")})
        cmd = [sys.executable, "-m", "boltzlab.grading.grader", "_execute", str(nb_path), str(results_path)]
        proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        status = "ok"
        try:
            out, _ = proc.communicate(timeout=timeout)
            if proc.returncode != 0:
                tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
                status = f"runner failed ({proc.returncode}): {' '.join(tail)}"[:300]
        except subprocess.TimeoutExpired:
            status = f"timeout after {timeout:g} s"
        finally:
            _kill_tree(proc, token)
        records = []
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records, status


def score(assignment: Assignment, records: list[dict], status: str) -> list[TestResult]:
    by_id = {}
    for r in records:
        by_id.setdefault(r.get("grade_id"), r)  # first execution counts
    results = []
    for t in assignment.tests:
        r = by_id.get(t.grade_id)
        if r is None:
            results.append(TestResult(t.grade_id, 0.0, t.points, f"not run ({status})"))
        elif r.get("ok"):
            results.append(TestResult(t.grade_id, t.points, t.points, (r.get("stdout") or "passed").strip()))
        else:
            results.append(TestResult(t.grade_id, 0.0, t.points, r.get("error", "failed")))
    return results


def grade_one(path: Path, root: Path, assignments: dict[str, Assignment], timeout: float) -> tuple[SubmissionResult, Assignment | None]:
    rel = str(path.relative_to(root))
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as err:  # any unreadable file is the submission's own problem
        return SubmissionResult(rel, "", f"invalid notebook: {type(err).__name__}: {str(err)[:200]}"), None
    assignment = identify(nb, path, assignments)
    if assignment is None:
        return SubmissionResult(rel, "", "no matching assignment in solutions/"), None
    records, status = run_notebook(prepare(nb, assignment), timeout)
    return SubmissionResult(rel, assignment.name, status, score(assignment, records, status)), assignment


def grade_folder(submissions: Path, solutions: Path, out_csv: Path, timeout: float = 120.0,
                 feedback_dir: Path | None = None, progress: bool = True) -> list[SubmissionResult]:
    """Grade every notebook under ``submissions``; write ``out_csv`` (and feedback reports)."""
    from tqdm.auto import tqdm

    if not submissions.is_dir():
        raise FileNotFoundError(f"submissions folder {submissions} does not exist")
    assignments = load_assignments(solutions)
    if not assignments:
        raise FileNotFoundError(f"no solution notebooks with graded cells in {solutions}")
    paths = sorted(p for p in submissions.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    graded = [grade_one(p, submissions, assignments, timeout) for p in tqdm(paths, desc="grading", disable=not progress)]
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


# ---------------------------------------------------------------------------------------
# The runner: executed in a subprocess by run_notebook.
# ---------------------------------------------------------------------------------------


def _execute(nb_path: Path, results_path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(nb_path, as_version=4)
    os.environ["HOME"] = str(nb_path.parent)

    def record(cell, cell_index, execute_reply, **_):
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if not gid:
            return
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        stdout = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
        rec = {"grade_id": gid, "ok": not errors, "stdout": stdout[-4000:]}
        if errors:
            rec["error"] = f"{errors[0].get('ename')}: {errors[0].get('evalue')}"[:2000]
        with results_path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")

    client = NotebookClient(nb, timeout=None, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(nb_path.parent)}},
                            on_cell_executed=record)
    client.execute()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_execute":
        _execute(Path(argv[1]), Path(argv[2]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m boltzlab.grading", description="Grade submitted exercise notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("grade", help="grade a folder of submissions into a CSV")
    g.add_argument("submissions", type=Path)
    g.add_argument("--out", type=Path, default=Path("scores.csv"))
    g.add_argument("--solutions", type=Path, default=REPO_ROOT / "solutions")
    g.add_argument("--timeout", type=float, default=120.0, help="wall-clock seconds per notebook")
    g.add_argument("--feedback", type=Path, default=None, help="folder for one Markdown report per submission")
    g.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = grade_folder(args.submissions, args.solutions, args.out, args.timeout, args.feedback, not args.no_progress)
    bad = sum(r.status != "ok" for r in results)
    print(f"graded {len(results)} submission(s) in {time.perf_counter() - t0:.1f} s "
          f"({bad} with problems); scores in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
