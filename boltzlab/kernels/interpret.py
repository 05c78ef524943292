r"""Run the Triton kernels on the CPU, with Triton's interpreter, in a child process.

Triton reads ``TRITON_INTERPRET`` when its ``@triton.jit`` decorators execute, so a process
that has already imported the kernels for a GPU (or that must not have the variable set, like
a test session) cannot switch. :func:`run_interpreted` therefore starts a fresh Python with
``TRITON_INTERPRET=1``, hands it the calls through a temporary file and returns the results.
The interpreter executes each kernel program with NumPy: slow per program, fine per element,
which is why the launchers put many configurations into one program in this mode.

Each call is a dict ``{"fn": "lj_energy_forces" | "mc_score_estimate", "energy": PairPotential,
"args": tuple, "kwargs": dict}`` (``backend="triton"`` is added). Results come back in order:
``(E, F)`` tuples, :class:`~boltzlab.kernels.ScoreEstimate` objects, or, for a call that
raised, a string starting with ``"error: "``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch

_FUNCTIONS = ("lj_energy_forces", "mc_score_estimate")


def run_interpreted(calls: list[dict[str, Any]], timeout: float = 600.0) -> list[Any]:
    """Run ``calls`` with the Triton kernels under the interpreter in a child process.

    Raises RuntimeError with the child's output when it fails as a whole (e.g. no triton).
    """
    for call in calls:
        if call.get("fn") not in _FUNCTIONS:
            raise ValueError(f"each call needs fn in {_FUNCTIONS}, got {call.get('fn')!r}")
    with tempfile.TemporaryDirectory(prefix="boltzlab-interpret-") as tmp:
        in_path, out_path = Path(tmp) / "calls.pt", Path(tmp) / "results.pt"
        torch.save(calls, in_path)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "boltzlab.kernels.interpret", str(in_path), str(out_path)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"the interpreter process failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return torch.load(out_path, weights_only=False)  # our own file, written just now


def _serve(in_path: str, out_path: str) -> None:
    """Child side: execute the calls with ``backend="triton"`` and save the results."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run me with TRITON_INTERPRET=1")
    import boltzlab.kernels as kernels

    calls = torch.load(in_path, weights_only=False)
    results: list[Any] = []
    for call in calls:
        fn = getattr(kernels, call["fn"])
        try:
            results.append(fn(call["energy"], *call.get("args", ()), **{**call.get("kwargs", {}), "backend": "triton"}))
        except Exception:  # reported per call so one bad case does not hide the others
            results.append("error: " + traceback.format_exc(limit=4))
    torch.save(results, out_path)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
