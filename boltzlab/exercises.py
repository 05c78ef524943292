"""Build the student exercise notebooks (``exercises/``) from ``solutions/``.

``solutions/NN_name.ipynb`` (paired with ``NN_name.py``) is the single source of an exercise.
Regions use nbgrader's markers:

- ``### BEGIN SOLUTION`` / ``### END SOLUTION``: replaced by ``raise NotImplementedError()``
  at the marker's indentation (in markdown cells: by "*Your answer here.*");
- ``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS``: removed, markers included.

Cells that are expected to raise in the untouched exercise are tagged ``raises-exception``
so that nbval (and the test of the exercises) expects exactly that: graded check cells
(nbgrader ``"grade": true``), solution cells whose region is at top level, and cells the
author tagged ``uses-exercise``. Outputs are cleared; cell ids are copied from the solution,
so the build is deterministic and ``check`` can compare byte for byte.

Usage::

    python -m boltzlab.exercises build         # write exercises/ from solutions/
    python -m boltzlab.exercises check         # exit 1 if exercises/ is stale or leaks a solution
    python -m boltzlab.exercises release DIR   # the student release: the course without solutions
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

from boltzlab.notebooks import stamp

BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
BEGIN_HIDDEN = "### BEGIN HIDDEN TESTS"
END_HIDDEN = "### END HIDDEN TESTS"
MARKERS = (BEGIN_SOLUTION, END_SOLUTION, BEGIN_HIDDEN, END_HIDDEN)
RAISES_TAG = "raises-exception"
USES_EXERCISE_TAG = "uses-exercise"
MARKDOWN_PLACEHOLDER = "*Your answer here.*"

REPO_ROOT = Path(__file__).resolve().parents[1]


class ExerciseFormatError(ValueError):
    """A solution notebook has unbalanced or nested markers."""


def _strip_regions(source: str, cell_type: str, where: str) -> tuple[str, bool, list[list[str]]]:
    """Return (exercise source, whether a solution region sat at top level, removed regions
    as lists of lines)."""
    out: list[str] = []
    removed: list[list[str]] = []
    state = None  # None, "solution" or "hidden"
    top_level = False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN_SOLUTION or stripped == BEGIN_HIDDEN:
            if state is not None:
                raise ExerciseFormatError(f"{where}: {stripped!r} inside an open region")
            state = "solution" if stripped == BEGIN_SOLUTION else "hidden"
            removed.append([])
            if state == "solution":
                indent = line[: len(line) - len(line.lstrip())]
                top_level |= indent == ""
                out.append(MARKDOWN_PLACEHOLDER if cell_type == "markdown" else f"{indent}raise NotImplementedError()")
            continue
        if stripped == END_SOLUTION or stripped == END_HIDDEN:
            expected = "solution" if stripped == END_SOLUTION else "hidden"
            if state != expected:
                raise ExerciseFormatError(f"{where}: {stripped!r} without its BEGIN marker")
            state = None
            continue
        if state is None:
            out.append(line)
        else:
            removed[-1].append(line)
    if state is not None:
        raise ExerciseFormatError(f"{where}: region opened but never closed")
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip()
    return text, top_level, removed


def build_exercise(solution: nbformat.NotebookNode, name: str) -> tuple[nbformat.NotebookNode, list[list[str]]]:
    """The exercise notebook for ``solution`` and the removed regions (lists of lines)."""
    nb = copy.deepcopy(solution)
    secret: list[list[str]] = []
    for idx, cell in enumerate(nb.cells):
        where = f"{name} cell {idx}"
        src, top_level, removed = _strip_regions(cell.source, cell.cell_type, where)
        secret += removed
        cell.source = src
        nbg = cell.metadata.get("nbgrader", {})
        tags = list(cell.metadata.get("tags", []))
        raises = cell.cell_type == "code" and (
            bool(nbg.get("grade")) or top_level or USES_EXERCISE_TAG in tags
        )
        if raises and RAISES_TAG not in tags:
            tags.append(RAISES_TAG)
        if tags:
            cell.metadata["tags"] = tags
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata.pop("jupytext", None)
    nb.metadata["boltzlab"] = {"assignment": name, "generated_from": f"solutions/{name}.ipynb"}
    stamp(nb)  # the metadata JupyterLab adds on opening, so opening it does not dirty it
    return nb, secret


def solution_notebooks(solutions_dir: Path) -> list[Path]:
    return sorted(p for p in solutions_dir.glob("*.ipynb") if not p.name.startswith("_"))


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def build_all(solutions_dir: Path, exercises_dir: Path) -> list[Path]:
    """Write one exercise notebook per solution notebook; returns the paths written."""
    exercises_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in solution_notebooks(solutions_dir):
        nb, _ = build_exercise(nbformat.read(path, as_version=4), path.stem)
        target = exercises_dir / path.name
        target.write_text(render(nb))
        written.append(target)
    return written


def _normalise(text: str) -> str:
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _leaked_region(regions: list[list[str]], text: str) -> str | None:
    """The first region of which ``text`` contains a run of (up to) 3 consecutive
    non-blank lines, or None. Runs, not single lines, so that a generic line such as
    ``kT = energy.kT`` elsewhere is not mistaken for a leak."""
    norm = _normalise(text)
    for region in regions:
        lines = [line.strip() for line in region if line.strip() and not line.strip().startswith("#")]
        if not lines or sum(map(len, lines)) < 12:
            continue
        k = min(3, len(lines))
        for i in range(len(lines) - k + 1):
            if "\n".join(lines[i : i + k]) in norm:
                return " / ".join(lines[i : i + k])
    return None


def check_all(solutions_dir: Path, exercises_dir: Path) -> list[str]:
    """Problems found: stale, missing or extra exercise notebooks, markers or solution lines leaked."""
    problems = []
    expected_names = set()
    for path in solution_notebooks(solutions_dir):
        expected_names.add(path.name)
        nb, secret = build_exercise(nbformat.read(path, as_version=4), path.stem)
        target = exercises_dir / path.name
        if not target.exists():
            problems.append(f"{target} is missing: run `python -m boltzlab.exercises build`")
            continue
        text = target.read_text()
        if text != render(nb):
            problems.append(f"{target} is stale: run `python -m boltzlab.exercises build`")
        for marker in MARKERS:
            if marker in text:
                problems.append(f"{target} contains the marker {marker!r}")
        sources = "\n".join(c.source for c in nbformat.reads(text, as_version=4).cells)
        leaked = _leaked_region(secret, sources)
        if leaked:
            problems.append(f"{target} leaks solution text: {leaked!r}")
    for extra in exercises_dir.glob("*.ipynb"):
        if extra.name not in expected_names:
            problems.append(f"{extra} has no source in {solutions_dir}")
    return problems


RELEASE_EXCLUDED = ("solutions/", "tests/", ".ci/", "notes/")


def release_files(repo: Path = REPO_ROOT) -> list[str]:
    """Tracked files that go into the student release: everything but solutions/, tests/, CI."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=repo, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"{repo} is not a git checkout; the release is made from tracked files") from err
    return [f for f in out.splitlines() if f and not f.startswith(RELEASE_EXCLUDED)]


def build_release(out_dir: Path, repo: Path = REPO_ROOT) -> list[str]:
    """Copy the student release into ``out_dir`` (which must not exist yet) and verify that
    no solution region, hidden test or marker from solutions/ is in it."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another folder")
    problems = check_all(repo / "solutions", repo / "exercises")
    if problems:
        raise RuntimeError("exercises/ is not ready for release:\n" + "\n".join(problems))
    files = release_files(repo)
    for rel in files:
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, target)
    leaks = find_leaks(out_dir, repo / "solutions")
    if leaks:
        shutil.rmtree(out_dir)
        raise RuntimeError("the release would leak solutions:\n" + "\n".join(leaks))
    return files


def find_leaks(folder: Path, solutions_dir: Path) -> list[str]:
    """Files under ``folder`` holding a run of lines from a solution or hidden-test region,
    and notebooks holding a region marker."""
    regions: list[list[str]] = []
    for path in solution_notebooks(solutions_dir):
        regions += build_exercise(nbformat.read(path, as_version=4), path.stem)[1]
    leaks = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if path.suffix == ".ipynb":  # compare cell sources, not JSON-escaped text
            text = "\n".join(c.source for c in nbformat.reads(text, as_version=4).cells)
            marker = next((m for m in MARKERS if m in text), None)
            if marker:
                leaks.append(f"{path.relative_to(folder)}: marker {marker!r}")
        leaked = _leaked_region(regions, text)
        if leaked:
            leaks.append(f"{path.relative_to(folder)}: {leaked!r}")
    return leaks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boltzlab.exercises", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "check", "release"])
    parser.add_argument("out", nargs="?", type=Path, help="release folder (for `release`)")
    parser.add_argument("--solutions", type=Path, default=REPO_ROOT / "solutions")
    parser.add_argument("--exercises", type=Path, default=REPO_ROOT / "exercises")
    args = parser.parse_args(argv)
    if args.command == "build":
        for p in build_all(args.solutions, args.exercises):
            print(f"wrote {p}")
        return 0
    if args.command == "release":
        if args.out is None:
            parser.error("release needs an output folder")
        files = build_release(args.out)
        print(f"wrote the student release ({len(files)} files, no solutions) to {args.out}")
        return 0
    problems = check_all(args.solutions, args.exercises)
    for p in problems:
        print(p, file=sys.stderr)
    print("exercises/ is up to date" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
