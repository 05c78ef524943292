r"""The committed notebooks carry the metadata JupyterLab would add, so opening one does not
mark it modified.

When a notebook's kernel starts, JupyterLab writes the kernel's ``language_info`` into the
notebook's metadata; if that changes the metadata, the notebook is dirty and autosave
rewrites a tracked file the learner never edited. :func:`stamp` writes the same
``language_info`` (ipykernel's, for the Python that runs it) into a notebook, and
``python -m boltzlab.notebooks stamp FILES`` does it in place; ``make sync`` and
``make exercises`` call it. Notebooks then stay clean for learners on the course's Python
(the ``version`` field is the interpreter's full version: another Python still marks them
modified, once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import nbformat

__all__ = ["kernel_language_info", "stamp", "stamp_files"]


def kernel_language_info() -> dict[str, Any]:
    """The ``language_info`` that ipykernel reports for this interpreter (what JupyterLab stores)."""
    try:
        from ipykernel.ipkernel import IPythonKernel

        info = IPythonKernel.language_info
    except ImportError:  # the package without the notebook extras: the same fields, by hand
        info = {"name": "python", "version": sys.version.split()[0], "mimetype": "text/x-python",
                "codemirror_mode": {"name": "ipython", "version": 3}, "pygments_lexer": "ipython3",
                "nbconvert_exporter": "python", "file_extension": ".py"}
    return {key: (dict(value) if isinstance(value, dict) else value) for key, value in info.items()}


def stamp(nb: nbformat.NotebookNode) -> bool:
    """Set ``nb.metadata.language_info`` to :func:`kernel_language_info`; return whether it changed."""
    info = kernel_language_info()
    if nb.metadata.get("language_info") == info:
        return False
    nb.metadata["language_info"] = info
    return True


def stamp_files(paths: list[Path]) -> list[Path]:
    """Stamp each ``.ipynb`` in ``paths`` in place; return the ones rewritten."""
    changed = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        if stamp(nb):
            path.write_text(nbformat.writes(nb) + "\n")
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boltzlab.notebooks")
    sub = parser.add_subparsers(dest="command", required=True)
    stamp_parser = sub.add_parser("stamp", help="write the kernel's language_info into notebooks, in place")
    stamp_parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in stamp_files(args.paths):
        print(f"stamped {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
