"""Budgets: how much work a notebook or command does.

``BOLTZLAB_BUDGET`` selects one of

- ``smoke``  : CI; every notebook in seconds to about a minute on 2 CPU cores,
- ``laptop`` : the default; each chapter in a few minutes on a laptop CPU,
- ``full``   : paper scale, meant for a GPU.

Notebooks never hard-code their sizes: they call :func:`sizes` with their chapter key
and read the fields of the dataclass it returns, e.g.::

    from boltzlab.config import sizes
    S = sizes("00")          # Chapter00Sizes for the current budget
    run_mcmc(..., n_steps=S.tunnelling_steps)

Each chapter's sizes are a frozen dataclass declared below with one instance per budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

BUDGETS: tuple[str, ...] = ("smoke", "laptop", "full")
DEFAULT_BUDGET = "laptop"
ENV_VAR = "BOLTZLAB_BUDGET"


class UnknownBudgetError(ValueError):
    """Raised when ``BOLTZLAB_BUDGET`` (or an argument) names no known budget."""


def check_budget(name: str) -> str:
    """Return ``name`` normalised, or raise :class:`UnknownBudgetError` listing the valid ones."""
    norm = name.strip().lower()
    if norm not in BUDGETS:
        raise UnknownBudgetError(
            f"unknown budget {name!r}: valid budgets are {', '.join(BUDGETS)} "
            f"(set {ENV_VAR} to one of them, or unset it for {DEFAULT_BUDGET!r})"
        )
    return norm


def budget() -> str:
    """The current budget: ``BOLTZLAB_BUDGET`` if set and non-empty, else ``'laptop'``."""
    value = os.environ.get(ENV_VAR, "")
    return check_budget(value) if value.strip() else DEFAULT_BUDGET


# --------------------------------------------------------------------------------------
# Per-chapter sizes. Add a dataclass and a triple to _REGISTRY for each chapter.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chapter00Sizes:
    """Chapter 00: Boltzmann distributions and MCMC."""

    landscape_grid: int  # grid points per axis for 2-D density plots
    tunnelling_chains: int  # independent chains for the tunnelling-time measurement
    tunnelling_steps: int  # steps per chain (Metropolis and parallel tempering alike)
    pt_temperatures: int  # replicas in parallel tempering
    metric_samples: int  # samples used to demonstrate the metrics
    reference_samples: int  # samples drawn from the shipped reference sets for plots


@dataclass(frozen=True)
class AppendixSizes:
    """Appendix A: the GPU kernels (live benchmark table)."""

    lj13_batch: int
    lj13_k: int
    lj55_batch: int
    lj55_k: int
    repeats: int
    include_autograd_baseline: bool


_REGISTRY: dict[str, dict[str, Any]] = {
    "00": {
        "smoke": Chapter00Sizes(60, 64, 2_000, 6, 500, 1_000),
        "laptop": Chapter00Sizes(200, 256, 20_000, 8, 2_000, 10_000),
        "full": Chapter00Sizes(300, 1_024, 100_000, 12, 10_000, 10_000),
    },
    "A": {
        "smoke": AppendixSizes(16, 64, 4, 16, 1, True),
        "laptop": AppendixSizes(128, 250, 32, 50, 2, True),
        "full": AppendixSizes(512, 1_000, 128, 100, 3, True),
    },
}


def sizes(chapter: str, budget_name: str | None = None) -> Any:
    """The sizes dataclass of ``chapter`` (e.g. ``"00"``) under ``budget_name`` or the current budget."""
    if chapter not in _REGISTRY:
        raise KeyError(f"no sizes for chapter {chapter!r}; known: {', '.join(sorted(_REGISTRY))}")
    name = check_budget(budget_name) if budget_name is not None else budget()
    return _REGISTRY[chapter][name]
