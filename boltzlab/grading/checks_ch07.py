"""Checks for the chapter 07 exercises: importance sampling.

- :func:`check_bar_free_energy`: ΔF = F_1 - F_0 by the Bennett acceptance ratio from
  Δu = u_1 - u_0 at samples of both states.
- :func:`check_log_z_bootstrap`: log Ẑ with its bootstrap standard error and 95 % interval.

Each check compares with an independent answer (a hand-solvable case, exact identities of
the estimator, :mod:`boltzlab.importance` on the same data) and names the usual mistakes
when it recognises them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab import importance
from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import (
    CheckFailed,
    all_passed,
    as_float,
    call_learner,
    expect_close,
    passed,
)

BarFn = Callable[[Tensor, Tensor], object]
BootstrapFn = Callable[[Tensor, int, torch.Generator], object]
F64 = torch.float64


# ----------------------------------------------------------------------------------------
# BAR
# ----------------------------------------------------------------------------------------


def _gaussian_states(n0: int, n1: int, seed: int) -> tuple[Tensor, Tensor, float]:
    """u_0 = x^2/2, u_1 = (x - 1)^2 / (2 * 0.8^2) + 0.3: samples of both, Δu at them, exact ΔF."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n0, generator=g, dtype=F64)
    x1 = 1.0 + 0.8 * torch.randn(n1, generator=g, dtype=F64)

    def du(x: Tensor) -> Tensor:
        return (x - 1.0) ** 2 / (2 * 0.64) + 0.3 - x**2 / 2

    return du(x0), du(x1), 0.3 - math.log(0.8)


def _bar_with_m(du0: Tensor, du1: Tensor, m: float) -> float:
    """The BAR root for a given constant M (M = log(n0/n1) is right; others are mistakes)."""
    def g(df: float) -> float:
        return float(torch.logsumexp(-torch.nn.functional.softplus(m + du0 - df), 0)
                     - torch.logsumexp(-torch.nn.functional.softplus(-m - du1 + df), 0))
    both = torch.cat([du0, du1])
    lo, hi = float(both.min()) - 50.0, float(both.max()) + 50.0  # ΔF lies between the FEP estimates, inside
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _name_bar_mistake(got: float, du0: Tensor, du1: Tensor, expected: float) -> str:
    n0, n1 = du0.numel(), du1.numel()
    candidates = {
        "the sign is flipped: ΔF = F_1 - F_0 = -log(Z_1/Z_0); check which side of the equation holds the "
        "samples of state 0 (f(M + Δu - ΔF)) and which those of state 1 (f(-M - Δu + ΔF))": -expected,
        "that is forward FEP, -log mean(exp(-Δu)) over the samples of state 0 alone: BAR uses the samples "
        "of state 1 too": importance.fep_free_energy(du0, "forward").delta_f,
        "that is reverse FEP, log mean(exp(Δu)) over the samples of state 1 alone: BAR uses the samples "
        "of state 0 too": importance.fep_free_energy(du1, "reverse").delta_f,
    }
    if n0 != n1:
        candidates["you left out M = log(n_0/n_1) (or set it to 0): it matters when the two states have "
                   "different numbers of samples"] = _bar_with_m(du0, du1, 0.0)
        candidates["M has the wrong sign: M = log(n_0/n_1), with n_0 the number of samples of state 0 "
                   "(the length of du0)"] = _bar_with_m(du0, du1, math.log(n1 / n0))
    for message, value in candidates.items():
        if abs(got - value) < 1e-4 * max(1.0, abs(value)):
            return message
    return ("solve Σ_i f(M + du0_i - ΔF) = Σ_j f(-M - du1_j + ΔF) with f(z) = 1/(1 + e^z) and M = log(n0/n1); "
            "bisect until the interval is below 1e-8")


def _bar_case(fn: BarFn, du0: Tensor, du1: Tensor, label: str, tol: float = 1e-6, hint: str | None = None) -> float:
    expected = importance.bar_free_energy(du0, du1).delta_f
    got = as_float(f"bar_free_energy on {label}", call_learner(fn, du0.clone(), du1.clone(), name="bar_free_energy"))
    if not math.isfinite(got):
        raise CheckFailed(
            f"bar_free_energy on {label} returned {got}. Large Δu (here up to {float(torch.cat([du0, du1]).abs().max()):.0f}) "
            "overflow exp(); write log f(z) = -softplus(z) and compare the two sides with torch.logsumexp."
        )
    if abs(got - expected) > tol * max(1.0, abs(expected)):
        expect_close(f"bar_free_energy on {label}", got, expected, rtol=tol, atol=tol,
                     hint=hint or _name_bar_mistake(got, du0, du1, expected))
    return got


def check_bar_free_energy(fn: BarFn) -> None:
    """Check ``fn(du0 (n0,), du1 (n1,)) -> ΔF = F_1 - F_0`` in units of kT."""
    name = "bar_free_energy"
    # by hand: Δu = c at every sample of both states (equal counts) gives ΔF = c exactly
    got = as_float(f"{name} (Δu = 0.7 everywhere)",
                   call_learner(fn, torch.full((5,), 0.7, dtype=F64), torch.full((5,), 0.7, dtype=F64), name=name))
    if abs(got + 0.7) < 1e-6:
        raise CheckFailed(f"{name}: the sign is flipped. With Δu = u_1 - u_0 = 0.7 everywhere, state 1 is higher by "
                          f"0.7 kT and ΔF = F_1 - F_0 = +0.7; you gave {got:.4f}")
    expect_close(f"{name} with Δu = 0.7 at every sample of both states", got, 0.7, rtol=1e-6, atol=1e-6,
                 hint="when Δu is the same constant c everywhere, both sides balance at ΔF = c")
    passed("Δu constant: ΔF equals it")

    du0, du1, exact = _gaussian_states(400, 400, seed=606)
    _bar_case(fn, du0, du1, "two Gaussian states, 400 samples each")
    passed(f"two Gaussian states, equal sample sizes (exact ΔF = {exact:.4f})")

    du0, du1, _ = _gaussian_states(600, 150, seed=607)
    _bar_case(fn, du0, du1, "two Gaussian states, 600 and 150 samples")
    passed("unequal sample sizes (M = log(n0/n1))")

    _bar_case(fn, du0 + 1000.0, du1 + 1000.0, "the same states with u_1 raised by 1000 kT",
              hint="raising u_1 by a constant raises ΔF by the same constant, and your answer was right before the "
              "shift: exp() of Δu near 1000 overflows (or its Fermi function underflows to 0), or your search "
              "interval for ΔF is too narrow. Write log f(z) = -softplus(z), compare the two sides with "
              "torch.logsumexp, and widen the interval until the sign of the difference changes")
    passed("finite and correct when Δu is about 1000 (log space)")
    all_passed(name)


# ----------------------------------------------------------------------------------------
# bootstrap of log Z
# ----------------------------------------------------------------------------------------


def _four_floats(label: str, out: object) -> tuple[float, float, float, float]:
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        kind = f"a {type(out).__name__} of length {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise CheckFailed(f"{label} should return four numbers (estimate, standard error, low, high), got {kind}")
    return tuple(as_float(f"{label}[{k}]", v) for k, v in enumerate(out))  # type: ignore[return-value]


def check_log_z_bootstrap(fn: BootstrapFn) -> None:
    """Check ``fn(log_w (n,), n_boot, generator) -> (log Ẑ, SE, low, high)``."""
    name = "log_z_bootstrap"
    # equal weights: every replicate is the same, so SE = 0 and the interval is a point
    flat = torch.full((50,), -1.3, dtype=F64)
    est, se, low, high = _four_floats(name, call_learner(fn, flat, 100, torch.Generator().manual_seed(0), name=name))
    if abs(est - (-1.3 + math.log(50))) < 1e-6:
        raise CheckFailed(f"{name}: for 50 equal log-weights -1.3 you gave log Ẑ = {est:.4f} = -1.3 + log 50: "
                          "you summed the weights; Ẑ is their mean, subtract log n")
    expect_close(f"{name}: log Ẑ of 50 equal log-weights -1.3", est, -1.3, rtol=1e-9, atol=1e-9,
                 hint="log Ẑ = logsumexp(log w) - log n")
    expect_close(f"{name}: the standard error for equal weights (every replicate is the same)", se, 0.0, atol=1e-9)
    if not (abs(low + 1.3) < 1e-9 and abs(high + 1.3) < 1e-9):
        raise CheckFailed(f"{name}: with equal weights every replicate is -1.3, so the interval is [-1.3, -1.3]; "
                          f"you gave [{low:.4g}, {high:.4g}]")
    passed("equal weights: log Ẑ exact, zero standard error")

    g = torch.Generator().manual_seed(64)
    lw = 2.0 + 0.9 * torch.randn(600, generator=g, dtype=F64)
    n = lw.numel()
    est, se, low, high = _four_floats(name, call_learner(fn, lw.clone(), 2000, torch.Generator().manual_seed(5),
                                                         name=name))
    exact_est = float(torch.logsumexp(lw, 0)) - math.log(n)
    if abs(est - exact_est) > 1e-9:
        mistakes = {float(lw.mean()): "that is the mean of log w (a lower bound on log Z by Jensen), not the log of "
                                      "the mean weight: log Ẑ = logsumexp(log w) - log n",
                    exact_est + math.log(n): "you summed the weights; Ẑ is their mean, subtract log n"}
        hint = next((m for v, m in mistakes.items() if abs(est - v) < 1e-6), "log Ẑ = logsumexp(log w) - log n")
        expect_close(f"{name}: log Ẑ", est, exact_est, rtol=1e-9, atol=1e-9, hint=hint)
    reference = importance.log_z_bootstrap(lw, n_boot=4000, generator=torch.Generator().manual_seed(6))
    if se < 0.2 * reference.standard_error:
        raise CheckFailed(f"{name}: your standard error {se:.4g} is far below the bootstrap's "
                          f"{reference.standard_error:.4g}: your replicates barely vary. Draw the n indices WITH "
                          "replacement (torch.randint), not a permutation: a permutation of the weights always "
                          "gives the same log Ẑ")
    if abs(se - float(lw.std()) / math.sqrt(n)) < 1e-6:
        raise CheckFailed(f"{name}: your standard error is sd(log w)/sqrt(n), the error of a mean of log w, not of "
                          "log Ẑ: take the standard deviation of the bootstrap replicates of log Ẑ")
    if abs(se / reference.standard_error - math.sqrt(2)) < 0.15:
        raise CheckFailed(f"{name}: your standard error is about sqrt(2) times the bootstrap's "
                          f"({se:.4g} vs {reference.standard_error:.4g}): each replicate must draw n indices, as many "
                          "as there are weights, not fewer")
    expect_close(f"{name}: bootstrap standard error with n_boot = 2000", se, reference.standard_error, rtol=0.12,
                 hint="the standard deviation of n_boot replicates, each log Ẑ of n weights drawn with replacement")
    passed("log Ẑ exact, standard error within 12 % of a 4000-replicate bootstrap")

    if not low < est < high:
        raise CheckFailed(f"{name}: the interval [{low:.4g}, {high:.4g}] should contain the estimate {est:.4g}: "
                          "return (estimate, se, low, high) in this order, low the 2.5 % quantile")
    for label, got, want in (("low (2.5 % quantile)", low, reference.low), ("high (97.5 % quantile)", high, reference.high)):
        if abs(got - want) > 0.35 * reference.standard_error:
            raise CheckFailed(f"{name}: {label} is {got:.4f}, the bootstrap gives about {want:.4f} (standard error "
                              f"{reference.standard_error:.4f}). Hint: torch.quantile of the replicates at 0.025 and 0.975")
    passed("95 % interval from the replicates' quantiles")

    again = _four_floats(name, call_learner(fn, lw.clone(), 200, torch.Generator().manual_seed(7), name=name))
    repeat = _four_floats(name, call_learner(fn, lw.clone(), 200, torch.Generator().manual_seed(7), name=name))
    if again != repeat:
        raise CheckFailed(f"{name}: two calls with identically seeded generators gave different answers "
                          f"({again[1]:.6g} vs {repeat[1]:.6g}): draw the indices with generator=generator")
    big = (5000.0 + torch.randn(200, generator=g)).float()
    out = _four_floats(name, call_learner(fn, big, 100, torch.Generator().manual_seed(8), name=name))
    if not all(math.isfinite(v) for v in out):
        raise CheckFailed(f"{name}: log-weights near 5000 gave {out}: exp(5000) overflows; use torch.logsumexp")
    passed("reproducible with the generator, finite for log-weights near 5000")
    all_passed(name)


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {"bar_free_energy": ("boltzlab.importance.bar_free_energy",),
                  "log_z_bootstrap": ("boltzlab.importance.log_z_bootstrap",)}
write_yourself.register(WRITE_YOURSELF)
