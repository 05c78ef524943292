"""torch.compile for the score network, with a fallback to eager mode that says why, and the
bfloat16 forward pass of ``IDEMConfig(precision="bfloat16")`` (:class:`LowPrecisionForward`).

Measured on the 2-core CPU machine (one thread per process, LJ-13 EGNN, hidden 64, 4 layers,
benchmarks/bench_training.py): the compiled forward pass without gradients (the reverse-SDE
refill) took about 0.6x the eager time and the compiled training step about 0.85x; compiling
costs 10-40 s per input shape, so it pays only for runs of many steps (see
:func:`compile_wanted`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from boltzlab.kernels.cpu import compile_env_setting

PRECISIONS = ("float32", "bfloat16")
"""Arithmetic of the score network's matrix products during training (:class:`LowPrecisionForward`)."""

AUTO_COMPILE_MIN_STEPS = 1_000
"""With ``compile=None``, compile the network of runs with at least this many regression steps."""


def compile_wanted(compile: bool | None, regression_steps: int) -> bool:
    """An explicit bool wins, then ``BOLTZLAB_COMPILE``, then "at least
    :data:`AUTO_COMPILE_MIN_STEPS` regression steps in the run"."""
    if compile is not None:
        return bool(compile)
    setting = compile_env_setting()
    return setting if setting is not None else regression_steps >= AUTO_COMPILE_MIN_STEPS


class CompiledForward:
    """Calls ``module`` through ``torch.compile(module, dynamic=False)`` (one compiled graph per
    input shape); if compiling fails (no C++ compiler, an unsupported operation), warns once,
    naming the error, and calls ``module`` eagerly from then on. Same signature as ``module``."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._compiled = torch.compile(module, dynamic=False)
        self.failed = False

    def __call__(self, *args: Any) -> Any:
        if not self.failed:
            try:
                with warnings.catch_warnings():
                    # torch's own deprecation notices while compiling are not failures
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return self._compiled(*args)
            except Exception as err:  # a missing C++ compiler shows up with many error types
                self.failed = True
                warnings.warn(f"torch.compile failed for {type(self.module).__name__} "
                              f"({type(err).__name__}: {err}); continuing in eager mode", RuntimeWarning,
                              stacklevel=2)
        return self.module(*args)


def maybe_compiled(module: nn.Module, enabled: bool) -> Any:
    """``CompiledForward(module)`` when ``enabled``, else ``module`` itself."""
    return CompiledForward(module) if enabled else module


class LowPrecisionForward:
    """Calls ``forward`` under ``torch.autocast(bfloat16)`` and returns its output in float32.

    Autocast runs the matrix products (the linear layers) in bfloat16 with float32
    accumulation; the weights, the coordinates, the pair differences and distances, and
    the output stay float32. On CPUs with bfloat16 dot products (AVX512-BF16 or AMX) those
    products ran about 5x faster than in float32 (2-core machine of ``benchmarks/``, 20,000
    x 64 by 64 x 64: 0.33 against 1.48 ms), the LJ-13 EGNN's training step about 1.8x.
    Rounding: about 3 significant digits per product (relative 2^-8), far below the Monte
    Carlo noise of the regression targets. Same signature as ``forward``.
    """

    def __init__(self, forward: Any) -> None:
        self.forward = forward

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = self.forward(x, *args)
        return out.float()


def with_precision(forward: Any, precision: str) -> Any:
    """``forward`` itself for ``"float32"``, :class:`LowPrecisionForward` for ``"bfloat16"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    return forward if precision == "float32" else LowPrecisionForward(forward)
