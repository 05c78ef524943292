"""Types and input checks shared by :mod:`boltzlab.diffusion`: every bad input raises
:class:`DiffusionInputError` (a ``ValueError``) naming the problem."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.validation import check_positive_float, check_positive_int

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Projection = Callable[[Tensor], Tensor]


class DiffusionInputError(ValueError):
    """Raised for a bad schedule, a bad number of steps, or samples of the wrong shape."""


def _identity(x: Tensor) -> Tensor:
    return x


def _positive_int(value: object, name: str) -> int:
    return check_positive_int(value, name, DiffusionInputError)


def _positive_float(value: object, name: str) -> float:
    return check_positive_float(value, name, DiffusionInputError)


def _check_steps(n_steps: int) -> int:
    return _positive_int(n_steps, "n_steps")


def _check_state(x: Tensor, dim: int | None = None, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise DiffusionInputError(f"{name} must be a floating tensor of shape (B, dim), got {getattr(x, 'shape', x)!r}")
    if dim is not None and x.shape[1] != dim:
        raise DiffusionInputError(f"{name} has last dimension {x.shape[1]}, expected {dim}")
    if not torch.isfinite(x).all():
        raise DiffusionInputError(f"{name} contains NaN or infinite values")
    return x
