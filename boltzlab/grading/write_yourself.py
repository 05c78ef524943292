"""Package functions that an exercise asks the learner to write refuse to serve its check.

The course ships working versions of several exercise answers (``boltzlab.metrics.kish_ess``,
``boltzlab.importance.bar_free_energy``, ...), because the chapters use them. While a check
runs the learner's function (:func:`boltzlab.grading.feedback.call_learner`), the package
functions listed for that exercise raise :class:`WriteThisYourself`, so a learner's
function that only calls the package's version fails the check and is told why, in the
notebook and in the grader alike (every graded cell starts with its check). Outside a check
the functions work as usual.

Each ``checks_*`` module lists its exercises' functions in a ``WRITE_YOURSELF`` mapping
(exercise name -> dotted names) and passes it to :func:`register`. A guard replaces the
function everywhere the package and the notebook refer to it, so importing it under
another name before the check does not get around it.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_registry: dict[str, tuple[str, ...]] = {}
_guarded: dict[str, Callable[..., Any]] = {}  # dotted name -> its guard
_forbidden: ContextVar[frozenset[str]] = ContextVar("boltzlab_forbidden", default=frozenset())


class WriteThisYourself(RuntimeError):
    """The learner's function called the package's version of what it should compute."""


def register(lists: Mapping[str, Sequence[str]]) -> None:
    """Record each exercise's list and guard the functions on it."""
    for exercise, names in lists.items():
        for name in names:
            _guard(name)
        _registry[exercise] = tuple(names)  # only once every name on it exists


def install_all() -> None:
    """Import every checks module of the course (each registers its lists); the grader runs
    this in each kernel before the submission's first cell."""
    import boltzlab.grading as grading

    for module in pkgutil.iter_modules(grading.__path__):
        if module.name.startswith("checks_"):
            importlib.import_module(f"boltzlab.grading.{module.name}")


def forbidden_for(exercise: str) -> tuple[str, ...]:
    """The dotted names of the package functions that ``exercise`` asks the learner to write."""
    return _registry.get(exercise, ())


@contextmanager
def forbidding(exercise: str) -> Iterator[None]:
    """Within the block, the functions listed for ``exercise`` raise :class:`WriteThisYourself`."""
    token = _forbidden.set(frozenset(forbidden_for(exercise)))
    try:
        yield
    finally:
        _forbidden.reset(token)


def _resolve(dotted: str) -> tuple[Any, str]:
    module_name, _, attr = dotted.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        getattr(module, attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"WRITE_YOURSELF names {dotted!r}, which does not exist: {err}") from err
    return module, attr


def _guard(dotted: str) -> None:
    if dotted in _guarded:
        return
    module, attr = _resolve(dotted)
    original = getattr(module, attr)

    def guard(*args: Any, **kwargs: Any) -> Any:
        if dotted in _forbidden.get():
            raise WriteThisYourself(
                f"it calls {dotted}, the package's version of what this exercise asks you to write: "
                "write it yourself (inside this check the package's version refuses to run, so calling it "
                "earns no points)")
        return original(*args, **kwargs)

    guard.__name__, guard.__qualname__, guard.__doc__ = original.__name__, original.__qualname__, original.__doc__
    guard.__module__ = original.__module__
    _guarded[dotted] = guard
    # every name bound to the original in the package or the notebook now means the guard
    for name, loaded in list(sys.modules.items()):
        if loaded is None or not (name == "__main__" or name == "boltzlab" or name.startswith("boltzlab.")):
            continue
        for key, value in list(vars(loaded).items()):
            if value is original:
                setattr(loaded, key, guard)
