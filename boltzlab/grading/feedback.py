"""Specific feedback for exercise checks.

A check is a plain function that calls the learner's code on chosen inputs and compares
with an independent answer. The helpers here turn a mismatch into a sentence a learner can
act on ("returned shape (10,), expected (10, 2)"; "ESS for equal weights of 100 samples
was 10.0, expected 100.0 (off by 90.0)"), instead of a bare ``AssertionError``.

In a notebook, a failed check shows only its message: importing this module makes IPython
print :class:`CheckFailed` and :class:`ExerciseNotAttempted` as one line, without the
traceback through the package's check code (the cell still fails: the kernel's reply
says ``error``, which is what graders read).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from boltzlab.grading.write_yourself import WriteThisYourself, forbidding


class CheckFailed(AssertionError):
    """A learner's function gave a wrong answer; the message says which and by how much."""


class ExerciseNotAttempted(NotImplementedError):
    """The learner's function still raises NotImplementedError (the exercise is untouched)."""


def call_learner(fn: Callable[..., Any], *args: Any, name: str | None = None, exercise: str | None = None,
                 **kwargs: Any) -> Any:
    """Call the learner's ``fn`` for ``exercise`` (default ``name``); turn ``NotImplementedError``
    into a friendly :class:`ExerciseNotAttempted`, a call to the package's version of the
    answer into a :class:`CheckFailed` that says to write it, and any other exception into
    :class:`CheckFailed` that names it. The learner's traceback is not chained: the message
    says what happened, and the package's frames would only hide it."""
    label = name or getattr(fn, "__name__", "your function")
    if not callable(fn):
        raise CheckFailed(f"expected a function for {label}, got {type(fn).__name__}")
    try:
        with forbidding(exercise or label):
            return fn(*args, **kwargs)
    except NotImplementedError:
        raise ExerciseNotAttempted(
            f"{label} still raises NotImplementedError: replace the `raise NotImplementedError()` "
            "in the cell above with your solution, run that cell, then run this check again."
        ) from None
    except WriteThisYourself as err:
        raise CheckFailed(f"{label} does not count: {err}") from None
    except Exception as err:  # the learner's bug, reported as such
        raise CheckFailed(f"{label} raised {type(err).__name__}: {err}") from None


def expect_tensor(label: str, got: Any) -> Tensor:
    """The value must be a torch.Tensor."""
    if not isinstance(got, Tensor):
        raise CheckFailed(f"{label} should be a torch.Tensor, got {type(got).__name__}")
    return got


def expect_shape(label: str, got: Any, shape: Sequence[int]) -> Tensor:
    """The value must be a tensor of exactly ``shape``."""
    t = expect_tensor(label, got)
    if tuple(t.shape) != tuple(shape):
        raise CheckFailed(f"{label} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    return t


def expect_finite(label: str, got: Tensor | float) -> None:
    """No NaN or inf."""
    bad = ~torch.isfinite(torch.as_tensor(got))
    if bool(bad.any()):
        raise CheckFailed(f"{label} contains {int(bad.sum())} NaN or infinite value(s)")


def as_float(label: str, got: Any) -> float:
    """A Python float from a float, int or one-element tensor, or a CheckFailed."""
    if isinstance(got, Tensor):
        if got.numel() != 1:
            raise CheckFailed(f"{label} should be a single number, got a tensor of shape {tuple(got.shape)}")
        got = got.item()
    if not isinstance(got, (int, float)):
        raise CheckFailed(f"{label} should be a number, got {type(got).__name__}")
    return float(got)


def expect_close(label: str, got: Any, expected: Any, rtol: float = 1e-5, atol: float = 1e-8, hint: str = "") -> None:
    """|got - expected| <= atol + rtol |expected|, elementwise; the message gives the worst entry."""
    tail = f" Hint: {hint}" if hint else ""
    if isinstance(expected, Tensor):
        g = expect_shape(label, got, expected.shape).to(torch.float64)
        e = expected.to(torch.float64)
        expect_finite(label, g)
        err = (g - e).abs()
        tol = atol + rtol * e.abs()
        if bool((err > tol).any()):
            k = int((err - tol).flatten().argmax())
            raise CheckFailed(
                f"{label} is off at {int((err > tol).sum())} of {err.numel()} entries; worst at flat index {k}: "
                f"got {g.flatten()[k].item():.6g}, expected {e.flatten()[k].item():.6g}.{tail}"
            )
        return
    g_f, e_f = as_float(label, got), float(expected)
    if not math.isfinite(g_f) or abs(g_f - e_f) > atol + rtol * abs(e_f):
        raise CheckFailed(f"{label} is {g_f:.6g}, expected {e_f:.6g} (off by {abs(g_f - e_f):.3g}).{tail}")


def passed(message: str) -> None:
    """Report one passed part of a check to the learner."""
    print(f"  ok  {message}")


def all_passed(exercise: str) -> None:
    print(f"All checks passed for {exercise}.")


def _show_message_only(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> None:
    """IPython handler for failed checks: the exception's one line, as the cell's error
    (``showtraceback(exception_only=True)`` would add a line about ``%tb`` above it)."""
    shell._showtraceback(etype, value, shell.InteractiveTB.get_exception_only(etype, value))


def _install_message_only_display() -> None:
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: normal tracebacks
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((CheckFailed, ExerciseNotAttempted), _show_message_only)


_install_message_only_display()
