"""Input checks shared by energies, flows and models: a clear error naming the problem
instead of a stack trace from deep inside torch."""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from typing import Any

from torch import Tensor


def check_points(x: object, dim: int, name: str, error: type[ValueError] = ValueError,
                 batched: bool = False, hint: str = "") -> Tensor:
    """``x`` must be a floating tensor of shape ``(..., dim)`` (``(batch, dim)`` when
    ``batched``); raises ``error`` naming what is wrong, else returns ``x`` unchanged."""
    if not isinstance(x, Tensor):
        raise error(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise error(f"{name}: expected a floating tensor (float32 or float64), got {x.dtype}")
    if batched and (x.ndim != 2 or x.shape[1] != dim):
        raise error(f"{name}: expected shape (batch, {dim}), got {tuple(x.shape)}")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise error(f"{name}: expected shape (..., {dim}), got {tuple(x.shape)}{hint}")
    return x


def check_positive_int(value: object, name: str, error: type[ValueError] = ValueError) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ``error`` naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise error(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_float(value: object, name: str, error: type[ValueError] = ValueError) -> float:
    """``value`` as a float if it is a finite int or float > 0 (not a bool), else ``error`` naming
    ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise error(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def parse_field_override(text: str, error: type[ValueError] = ValueError,
                         known: Collection[str] | None = None) -> tuple[str, Any]:
    """A command line's ``--set FIELD=VALUE`` as ``(field, value)``: the value is read as JSON
    (numbers, booleans, lists) and kept as the raw string otherwise. ``error`` names a missing
    ``=`` or, when ``known`` is given, a field not in it."""
    if "=" not in text:
        raise error(f"--set expects FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    if known is not None and key not in known:
        raise error(f"unknown config field {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value
