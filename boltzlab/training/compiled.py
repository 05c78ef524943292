"""torch.compile for the score network, with a fallback to eager mode that says why.

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
