"""Checks for the chapter 08 exercises: soft-optimal roll-out weights and a best-of-N sampler.

1. ``soft_optimal_weights(rewards, alpha) -> (weights, value)``: rewards ``(B, M)``,
   weights = softmax over the M completions of r/alpha, value = alpha log mean_m exp(r/alpha).
   Compared, in float64, with a reference written here from the definition (explicit max shift),
   on a generic case, at a second alpha, on rewards of size 1e4, and against the closed form of a
   tilted Gaussian; a wrong answer is matched against known mistakes.
2. ``best_of_n(sample, reward, n, batch) -> (batch, dim)``: checked by its distribution (for
   uniform samples and reward x the best of n has CDF u^n: a Kolmogorov-Smirnov distance names
   the distribution it matches instead), by the number of samples it draws, and by returning
   whole samples (coordinates that belong together stay together).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import (
    CheckFailed,
    all_passed,
    call_learner,
    expect_close,
    expect_shape,
    passed,
)

F64 = torch.float64
WeightsFn = Callable[[Tensor, float], tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------
# exercise 1: soft-optimal weights and value
# ----------------------------------------------------------------------------------------


def _reference(rewards: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    r = rewards.to(F64) / alpha
    top = r.max(dim=1, keepdim=True).values
    e = torch.exp(r - top)
    total = e.sum(dim=1, keepdim=True)
    value = alpha * (top[:, 0] + torch.log(total[:, 0] / r.shape[1]))
    return e / total, value


def _weight_mistakes(rewards: Tensor, alpha: float) -> dict[str, Tensor]:
    r = rewards.to(F64)
    return {
        "alpha_multiplies": torch.softmax(alpha * r, dim=1),
        "over_batch": torch.softmax(r / alpha, dim=0),
        "unnormalised": torch.exp(r / alpha - (r / alpha).amax(1, keepdim=True)),
        "uniform": torch.full_like(r, 1.0 / r.shape[1]),
    }


_WEIGHT_HINTS = {
    "alpha_multiplies": "the weights are exp(r / alpha), divided by alpha, not multiplied: a large alpha should "
    "make the weights more uniform (less tilt), a small alpha sharper",
    "over_batch": "normalise over the M completions of each state (dim=1 of the (B, M) rewards), not over the batch",
    "unnormalised": "the weights of each state must sum to one: divide exp(r/alpha - max) by its sum over the M "
    "completions (torch.softmax(..., dim=1) does both)",
    "uniform": "all your weights are 1/M: the rewards must enter, w_m ∝ exp(r_m / alpha)",
}


def _value_mistakes(rewards: Tensor, alpha: float) -> dict[str, Tensor]:
    r = rewards.to(F64)
    lse = torch.logsumexp(r / alpha, dim=1)
    w = torch.softmax(r / alpha, dim=1)
    return {
        "no_alpha": lse - math.log(r.shape[1]),
        "no_mean": alpha * lse,
        "mean_reward": r.mean(1),
        "max_reward": r.amax(1),
        "tilted_mean_reward": (w * r).sum(1),
        "alpha_inside": torch.logsumexp(alpha * r, dim=1) / alpha - math.log(r.shape[1]) / alpha,
    }


_VALUE_HINTS = {
    "no_alpha": "the value is alpha * log mean exp(r/alpha): multiply the log-mean-exp by alpha so that V has the "
    "units of the reward",
    "no_mean": "you took alpha * logsumexp(r/alpha), the log of a SUM: the value is the log of the MEAN, subtract "
    "alpha * log(M)",
    "mean_reward": "you returned the plain mean reward: that is the value only in the limit alpha -> infinity; use "
    "alpha * log mean exp(r/alpha)",
    "max_reward": "you returned the best reward: that is the value only in the limit alpha -> 0; use "
    "alpha * log mean exp(r/alpha)",
    "tilted_mean_reward": "you returned sum_m w_m r_m, the mean reward under the tilted weights; the soft value is "
    "alpha * log mean exp(r/alpha) (it also pays for the KL of the tilt, so it is smaller)",
    "alpha_inside": "the tilt is exp(r / alpha), not exp(alpha * r)",
}


def _name(got: Tensor, variants: dict[str, Tensor], hints: dict[str, str], default: str) -> str:
    for key, wrong in variants.items():
        if got.shape == wrong.shape and torch.allclose(got.to(F64), wrong, rtol=1e-5, atol=1e-7):
            return hints[key]
    return default


def _weights_case(fn: WeightsFn, rewards: Tensor, alpha: float, label: str) -> tuple[Tensor, Tensor]:
    out = call_learner(fn, rewards.clone(), alpha, name="soft_optimal_weights")
    if not isinstance(out, tuple) or len(out) != 2:
        raise CheckFailed(f"soft_optimal_weights on {label} should return a tuple (weights, value), got "
                          f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of length {len(out)}'}")
    weights, value = out
    b, m = rewards.shape
    expect_shape(f"weights on {label}", weights, (b, m))
    expect_shape(f"value on {label}", value, (b,))
    for name, t in (("weights", weights), ("value", value)):
        if not bool(torch.isfinite(t).all()):
            raise CheckFailed(
                f"{name} on {label} contains NaN or inf. exp(r/alpha) overflows for large rewards. Hint: subtract "
                "the largest r/alpha of each state before exponentiating (torch.softmax and torch.logsumexp do it)."
            )
    ref_w, ref_v = _reference(rewards, alpha)
    if not torch.allclose(weights.to(F64), ref_w, rtol=1e-5, atol=1e-8):
        hint = _name(weights, _weight_mistakes(rewards, alpha), _WEIGHT_HINTS,
                     "w_m = exp(r_m/alpha) / sum_m' exp(r_m'/alpha), for each state separately")
        expect_close(f"weights on {label}", weights.to(F64), ref_w, rtol=1e-5, atol=1e-8, hint=hint)
    if not torch.allclose(value.to(F64), ref_v, rtol=1e-5, atol=1e-6):
        hint = _name(value, _value_mistakes(rewards, alpha), _VALUE_HINTS,
                     "V = alpha * (logsumexp(r/alpha over the M completions) - log M)")
        expect_close(f"value on {label}", value.to(F64), ref_v, rtol=1e-5, atol=1e-6, hint=hint)
    return weights, value


def check_soft_optimal_weights(fn: WeightsFn) -> None:
    """Run the learner's ``soft_optimal_weights`` on four cases; raise :class:`CheckFailed` naming the mistake."""
    g = torch.Generator().manual_seed(707)
    rewards = 2.0 * torch.randn(4, 6, generator=g, dtype=F64)
    _weights_case(fn, rewards, 0.7, "rewards (4, 6), alpha = 0.7")
    passed("shapes (B, M) and (B,), weights and value at alpha = 0.7")

    _weights_case(fn, rewards, 3.0, "the same rewards at alpha = 3")
    passed("alpha enters the weights and the value correctly")

    huge = torch.tensor([[1.0e4, 1.0e4 - 2.0, -5.0e3], [-2.0e4, -2.0e4 + 1.0, -2.0e4 + 3.0]], dtype=F64)
    _weights_case(fn, huge, 1.0, "rewards of size 1e4")
    passed("finite and correct for rewards of size 1e4 (logsumexp)")

    # x ~ N(0, 1), r = a x: the tilt e^{r/alpha} gives N(a/alpha, 1), V = a^2 / (2 alpha)
    a, alpha, m = 1.5, 2.0, 200_000
    x = torch.randn(1, m, generator=g, dtype=F64)
    weights, value = _weights_case(fn, a * x, alpha, f"{m} Gaussian samples with r = {a} x")
    ess = 1.0 / float(weights.to(F64).pow(2).sum())
    expect_close("tilted mean sum_m w_m x_m", float((weights.to(F64) * x).sum()), a / alpha,
                 atol=5.0 / math.sqrt(ess), hint="the weights should tilt N(0, 1) to N(a/alpha, 1)")
    expect_close("soft value", float(value), a**2 / (2 * alpha), atol=0.02,
                 hint="alpha log E[exp(a x / alpha)] = a^2 / (2 alpha) for x ~ N(0, 1)")
    passed("tilts a Gaussian to the exact tilted Gaussian, with the exact soft value")
    all_passed("soft_optimal_weights")


# ----------------------------------------------------------------------------------------
# exercise 2: best-of-N
# ----------------------------------------------------------------------------------------


class _CountingSampler:
    """Uniform samples on [0, 1]^dim (coordinate 2 = coordinate 1 + 10 when dim = 2), counting draws."""

    def __init__(self, dim: int, seed: int) -> None:
        self.dim, self.drawn, self.calls = dim, 0, 0
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, k: int) -> Tensor:
        if isinstance(k, Tensor):
            k = int(k)
        self.calls += 1
        self.drawn += int(k)
        u = torch.rand(int(k), 1, generator=self.generator, dtype=F64)
        return u if self.dim == 1 else torch.cat([u, u + 10.0], dim=1)


def _first_coordinate(x: Tensor) -> Tensor:
    return x[:, 0]


def _ks(values: Tensor, cdf: Callable[[Tensor], Tensor]) -> float:
    v = torch.sort(values.to(F64).flatten()).values
    n = v.numel()
    f = cdf(v.clamp(0.0, 1.0))
    upper = torch.arange(1, n + 1, dtype=F64) / n
    return float(torch.maximum((upper - f).abs(), (f - (upper - 1.0 / n)).abs()).max())


def _run_bon(fn: Callable[..., Tensor], n: int, batch: int, dim: int, seed: int, label: str) -> tuple[Tensor, int]:
    sampler = _CountingSampler(dim, seed)
    out = call_learner(fn, sampler, _first_coordinate, n, batch, name="best_of_n")
    expect_shape(f"best_of_n on {label}", out, (batch, dim))
    if not bool(torch.isfinite(out).all()):
        raise CheckFailed(f"best_of_n on {label} returned NaN or inf")
    return out, sampler.drawn


def check_best_of_n(fn: Callable[..., Tensor]) -> None:
    """Run the learner's ``best_of_n(sample, reward, n, batch)``; raise :class:`CheckFailed` naming the mistake."""
    n, batch = 5, 20_000
    out, drawn = _run_bon(fn, n, batch, 1, 11, f"uniform samples, reward x, n = {n}, batch = {batch}")
    if drawn != n * batch:
        raise CheckFailed(
            f"best_of_n drew {drawn} samples for {batch} outputs with n = {n}; it should draw exactly n * batch = "
            f"{n * batch} (n fresh candidates per output). Hint: call sample(n * batch) once and group the result."
        )
    passed(f"shape (batch, dim) and exactly n * batch = {n * batch} draws")

    tol = 1.63 / math.sqrt(batch)  # Kolmogorov-Smirnov at the 1% level
    candidates = {
        "correct": lambda u: u.pow(n),
        "min": lambda u: 1 - (1 - u).pow(n),
        "no_selection": lambda u: u,
        "top_of_pool": lambda u: ((u - (1 - 1.0 / n)) * n).clamp(0.0, 1.0),
        "n_minus_1": lambda u: u.pow(n - 1),
        "n_plus_1": lambda u: u.pow(n + 1),
    }
    distances = {k: _ks(out[:, 0], cdf) for k, cdf in candidates.items()}
    if distances["correct"] > tol:
        closest = min(distances, key=distances.get)
        hints = {
            "min": "you kept the candidate with the LOWEST reward: use argmax, not argmin",
            "no_selection": "your outputs are distributed like single samples: pick, for each output, the candidate "
            "with the largest reward among its own n",
            "top_of_pool": "you took the best `batch` samples of the whole pool: that is far more extreme than "
            "best-of-n; group the n * batch candidates into `batch` groups of n and take the best of EACH group",
            "n_minus_1": "your result looks like the best of n - 1: each group must hold n candidates",
            "n_plus_1": "your result looks like the best of n + 1: each group must hold n candidates",
            "correct": "",
        }
        hint = hints[closest] if closest != "correct" else "group the candidates into batch groups of n and take argmax"
        raise CheckFailed(
            f"for uniform samples and reward x the best of n = {n} has CDF u^{n}; your outputs are at Kolmogorov-Smirnov "
            f"distance {distances['correct']:.4f} from it (allowed {tol:.4f}). Hint: {hint}"
        )
    expect_close("mean of the best of 5 uniforms", float(out.mean()), n / (n + 1), atol=0.01)
    passed(f"the best of {n} uniforms has CDF u^{n} (Kolmogorov-Smirnov {distances['correct']:.4f})")

    out1, _ = _run_bon(fn, 1, 5_000, 1, 12, "n = 1")
    if _ks(out1[:, 0], lambda u: u) > 1.63 / math.sqrt(5_000):
        raise CheckFailed("with n = 1 best_of_n should return plain samples (uniform here), but the outputs are not "
                          "uniform. Hint: the best of one candidate is that candidate.")
    passed("n = 1 returns plain samples")

    out2, _ = _run_bon(fn, 4, 3_000, 2, 13, "2-D samples (x, x + 10), n = 4")
    if not torch.allclose(out2[:, 1] - out2[:, 0], torch.full((3_000,), 10.0, dtype=out2.dtype), atol=1e-6):
        raise CheckFailed(
            "best_of_n returned rows whose coordinates come from different candidates (the test samples are "
            "(u, u + 10), so every returned row must have x2 - x1 = 10). Hint: select whole rows: "
            "x.reshape(batch, n, dim)[torch.arange(batch), best]."
        )
    passed("returns whole samples of dimension 2")
    all_passed("best_of_n")


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {"soft_optimal_weights": ("boltzlab.finetune.soft_optimal_weights",)}
write_yourself.register(WRITE_YOURSELF)
