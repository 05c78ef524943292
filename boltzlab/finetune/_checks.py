"""Input checks shared by :mod:`boltzlab.finetune`: every bad input raises
:class:`FinetuneInputError` (a ``ValueError``) naming the problem."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.validation import check_positive_float, check_positive_int

Reward = Callable[[Tensor], Tensor]
"""A reward maps states ``(B, dim)`` to ``(B,)``."""


class FinetuneInputError(ValueError):
    """Raised for bad shapes, non-finite rewards, bad temperatures, alphas or sizes."""


# ----------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    return check_positive_int(value, name, FinetuneInputError)


def _positive_float(value: object, name: str) -> float:
    return check_positive_float(value, name, FinetuneInputError)


def _tensor(x: object, ndim: int, name: str, shape_text: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise FinetuneInputError(f"{name} must be a floating torch.Tensor of shape {shape_text}, got "
                                 f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if x.ndim != ndim:
        raise FinetuneInputError(f"{name} must have shape {shape_text}, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise FinetuneInputError(f"{name} contains {int((~torch.isfinite(x)).sum())} NaN or infinite value(s)")
    return x
