"""Checks for the chapter 08 exercises: soft-optimal roll-out weights, a best-of-N sampler, the
policy-gradient loss and the mixture roll-in.

1. ``soft_optimal_weights(rewards, alpha) -> (weights, value)``: rewards ``(B, M)``,
   weights = softmax over the M completions of r/alpha, value = alpha log mean_m exp(r/alpha).
   Compared, in float64, with a reference written here from the definition (explicit max shift),
   on a generic case, at a second alpha, on rewards of size 1e4, and against the closed form of a
   tilted Gaussian; a wrong answer is matched against known mistakes.
2. ``best_of_n(sample, reward, n, batch) -> (batch, dim)``: checked by its distribution (for
   uniform samples and reward x the best of n has CDF u^n: a Kolmogorov-Smirnov distance names
   the distribution it matches instead), by the number of samples it draws, and by returning
   whole samples (coordinates that belong together stay together).
3. ``policy_gradient_loss(log_probs, rewards, kl, alpha) -> scalar``: for a Gaussian policy
   N(theta, I) with pretrained N(theta0, I) and r = -|x - c|^2, the gradient of the loss in theta is
   compared with the leave-one-out estimator's on fixed batches (a wrong one matched against known
   mistakes: no baseline, a baseline that includes the sample, the KL's sign, summing, ...), with
   rewards that carry a gradient (they must be constants), and averaged over many batches against
   the exact gradient of E[r] - alpha KL.
4. ``mixture_rollin(rollin, student, pretrained, n, student_fraction) -> (x_t, t, from_student)``:
   with a fake ``rollin`` whose states say which model made them: ceil(f n) from the student, the
   rest from the pretrained model, one call per model, labels and times that match the states.
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


# ----------------------------------------------------------------------------------------
# exercise 3: the policy-gradient loss with a leave-one-out baseline and a KL penalty
# ----------------------------------------------------------------------------------------

PGLossFn = Callable[[Tensor, Tensor, Tensor, float], Tensor]


def _pg_reference(log_probs: Tensor, rewards: Tensor, kl: Tensor, alpha: float) -> Tensor:
    r = rewards.detach()
    b = r.shape[0]
    advantage = r - (r.sum() - r) / (b - 1)
    return -(advantage * log_probs - alpha * kl).mean()


def _pg_mistakes(log_probs: Tensor, rewards: Tensor, kl: Tensor, alpha: float) -> dict[str, Tensor]:
    r = rewards.detach()
    b = r.shape[0]
    loo = r - (r.sum() - r) / (b - 1)
    return {
        "no_baseline": -(r * log_probs - alpha * kl).mean(),
        "mean_with_self": -((r - r.mean()) * log_probs - alpha * kl).mean(),
        "kl_sign": -(loo * log_probs + alpha * kl).mean(),
        "no_kl": -(loo * log_probs).mean(),
        "kl_in_advantage": -((loo - alpha * kl.detach()) * log_probs).mean(),
        "ascent": (loo * log_probs - alpha * kl).mean(),
        "sum_over_batch": -(loo * log_probs - alpha * kl).sum(),
        "not_detached": -((rewards - (rewards.sum() - rewards) / (b - 1)) * log_probs - alpha * kl).mean(),
    }


_PG_HINTS = {
    "no_baseline": "your gradient is that of sum_b r_b log p_b with no baseline: subtract from each reward the mean "
    "of the OTHER rewards of the batch (leave-one-out), A_b = r_b - mean_{b' != b} r_b'",
    "mean_with_self": "you subtracted the batch mean including the sample itself: that baseline depends on the "
    "sample's own reward and shrinks the gradient by (B-1)/B; leave the sample out, A_b = r_b - mean_{b' != b} r_b'",
    "kl_sign": "the KL term has the wrong sign: the objective is E[r] - alpha KL, so the LOSS gets + alpha * kl",
    "no_kl": "the KL penalty is missing: add alpha * kl (its mean over the batch) to the loss",
    "kl_in_advantage": "the KL of this step enters through its own gradient (alpha * kl in the loss), not through the "
    "advantage: it depends on theta directly, and the sample x_b does not change what it is",
    "ascent": "your gradient points the wrong way: return the LOSS, minus the surrogate objective, so that "
    "gradient DEScent raises E[r] - alpha KL",
    "sum_over_batch": "your gradient is B times too large: average over the batch instead of summing",
    "not_detached": "the rewards carried a gradient here (they were computed from reparameterised samples) and "
    "it flowed into your loss: in the score-function estimator the advantage is a constant, use rewards.detach()",
}


def _pg_case(theta0: Tensor, c: Tensor, alpha: float, b: int, generator: torch.Generator,
             reparameterised: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One batch of the Gaussian policy N(theta, I), pretrained N(theta0, I), reward -|x - c|^2.

    Returns theta (a leaf), log_probs (B,) and kl (B,) that depend on it, rewards (B,) and the samples."""
    theta = (theta0 + 0.5).clone().requires_grad_(True)
    z = torch.randn(b, theta0.shape[0], generator=generator, dtype=F64)
    x = theta + z if reparameterised else theta.detach() + z
    log_probs = -0.5 * (x.detach() - theta).pow(2).sum(-1)  # up to a constant that does not depend on theta
    kl = (0.5 * (theta - theta0).pow(2).sum()).expand(b)  # KL(N(theta, I) || N(theta0, I))
    rewards = -(x - c).pow(2).sum(-1)
    return theta, log_probs, rewards, kl, x


def _pg_gradient(fn: PGLossFn, theta: Tensor, log_probs: Tensor, rewards: Tensor, kl: Tensor, alpha: float,
                 label: str) -> Tensor:
    loss = call_learner(fn, log_probs, rewards, kl, alpha, name="policy_gradient_loss")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise CheckFailed(f"policy_gradient_loss on {label} should return a scalar tensor (the loss), got {shape}. "
                          "Hint: average over the batch.")
    if not loss.requires_grad:
        raise CheckFailed(f"the loss on {label} does not depend on theta (no gradient): it must be built from "
                          "log_probs and kl, which carry theta's gradient; do not detach them or call .item()")
    (grad,) = torch.autograd.grad(loss.reshape(()), theta, allow_unused=True, retain_graph=True)
    if grad is None:
        raise CheckFailed(f"the loss on {label} does not depend on theta: build it from log_probs and kl")
    if not bool(torch.isfinite(grad).all()):
        raise CheckFailed(f"the gradient of your loss on {label} is not finite")
    return grad


def _pg_compare(fn: PGLossFn, theta: Tensor, log_probs: Tensor, rewards: Tensor, kl: Tensor, alpha: float,
                label: str) -> Tensor:
    grad = _pg_gradient(fn, theta, log_probs, rewards, kl, alpha, label)
    (ref,) = torch.autograd.grad(_pg_reference(log_probs, rewards, kl, alpha), theta, retain_graph=True)
    if not torch.allclose(grad.to(F64), ref, rtol=1e-6, atol=1e-9):
        hint = "L = -(1/B) sum_b [A_b log p_b - alpha kl_b] with A_b = r_b - mean_{b' != b} r_b' (a constant)"
        for key, wrong in _pg_mistakes(log_probs, rewards, kl, alpha).items():
            (g_wrong,) = torch.autograd.grad(wrong, theta, retain_graph=True)
            if torch.allclose(grad.to(F64), g_wrong, rtol=1e-6, atol=1e-9):
                hint = _PG_HINTS[key]
                break
        expect_close(f"gradient of your loss on {label}", grad.to(F64), ref, rtol=1e-6, atol=1e-9, hint=hint)
    return grad


def check_policy_gradient_loss(fn: PGLossFn) -> None:
    """Run the learner's ``policy_gradient_loss(log_probs, rewards, kl, alpha)``; raise :class:`CheckFailed`
    naming the mistake. The policy is N(theta, I) in 2-D, the pretrained model N(theta0, I), r = -|x - c|^2."""
    g = torch.Generator().manual_seed(808)
    theta0, c = torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([2.0, -1.0], dtype=F64)
    theta, log_probs, rewards, kl, _ = _pg_case(theta0, c, 0.5, 6, g)
    _pg_compare(fn, theta, log_probs, rewards, kl, 0.5, "a batch of 6, alpha = 0.5")
    passed("the gradient of your loss is the leave-one-out policy gradient on a batch of 6")

    theta, log_probs, rewards, kl, _ = _pg_case(theta0, c, 2.0, 3, g)
    _pg_compare(fn, theta, log_probs, rewards, kl, 2.0, "a batch of 3, alpha = 2")
    passed("alpha and the batch size enter correctly")

    theta, log_probs, rewards, kl, _ = _pg_case(theta0, c, 0.5, 5, g, reparameterised=True)
    _pg_compare(fn, theta, log_probs, rewards, kl, 0.5, "rewards that carry a gradient")
    passed("the rewards are treated as constants")

    # the estimator is unbiased: its mean over many batches is the exact gradient of
    # J = E[r] - alpha KL = -(|theta - c|^2 + 2) - alpha |theta - theta0|^2 / 2, with any baseline
    alpha, b, n_batches = 0.5, 4, 1500
    theta_val = theta0 + 0.5
    exact = -(2 * (theta_val - c) + alpha * (theta_val - theta0))
    grads = []
    for _ in range(n_batches):
        theta, log_probs, rewards, kl, _ = _pg_case(theta0, c, alpha, b, g)
        grads.append(-_pg_gradient(fn, theta, log_probs, rewards, kl, alpha, "a batch of 4").to(F64))
    grads_t = torch.stack(grads)
    se = grads_t.std(0) / math.sqrt(n_batches)
    if not bool(((grads_t.mean(0) - exact).abs() <= 5 * se + 1e-9).all()):
        raise CheckFailed(
            f"averaged over {n_batches} batches of {b}, minus the gradient of your loss is {grads_t.mean(0).tolist()}, "
            f"but the exact gradient of E[r] - alpha KL is {exact.tolist()} (standard error {se.max():.3f}). "
            "Hint: the baseline must not depend on the sample's own reward (leave it out)."
        )
    passed(f"unbiased: over {n_batches} batches it averages to the exact Gaussian gradient {exact.tolist()}")
    all_passed("policy_gradient_loss")


# ----------------------------------------------------------------------------------------
# exercise 4: the mixture roll-in
# ----------------------------------------------------------------------------------------


class _FakeRollin:
    """rollin(model, k) for two labelled 1-D 'models': the student's states are positive, the pretrained
    model's negative; t of state x is 1 / (1 + |x| / 1000), so a state and its time can be told apart."""

    def __init__(self, seed: int) -> None:
        self.calls: list[tuple[str, int]] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: object, k: int) -> tuple[Tensor, Tensor]:
        if isinstance(k, Tensor):
            k = int(k)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"rollin was asked for {k!r} states: call it only for a positive number of states")
        name = getattr(model, "name", "?")
        if name not in ("student", "pretrained"):
            raise ValueError("rollin got something other than the student or the pretrained model")
        self.calls.append((name, k))
        magnitude = 1.0 + 999.0 * torch.rand(k, 1, generator=self.generator, dtype=F64)
        x = magnitude if name == "student" else -magnitude
        return torch.cat([x, 2 * x], dim=1), 1.0 / (1.0 + magnitude[:, 0] / 1000.0)


class _Model:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} model>"


def _mixture_case(fn: Callable[..., tuple[Tensor, Tensor, Tensor]], n: int, fraction: float, seed: int
                  ) -> tuple[int, _FakeRollin]:
    rollin = _FakeRollin(seed)
    label = f"n = {n}, student_fraction = {fraction}"
    out = call_learner(fn, rollin, _Model("student"), _Model("pretrained"), n, fraction, name="mixture_rollin")
    if not isinstance(out, tuple) or len(out) != 3:
        raise CheckFailed(f"mixture_rollin on {label} should return a tuple (x_t, t, from_student)")
    x, t, from_student = out
    expect_shape(f"x_t on {label}", x, (n, 2))
    expect_shape(f"t on {label}", t, (n,))
    expect_shape(f"from_student on {label}", from_student, (n,))
    if from_student.dtype != torch.bool:
        raise CheckFailed(f"from_student on {label} should be a bool tensor, got {from_student.dtype}")
    drawn = sum(k for _, k in rollin.calls)
    if drawn != n:
        raise CheckFailed(f"mixture_rollin on {label} asked rollin for {drawn} states in all to return {n}: draw "
                          "exactly ceil(f n) from the student and the rest from the pretrained model, nothing to "
                          f"throw away (calls: {rollin.calls})")
    if len({name for name, _ in rollin.calls}) != len(rollin.calls):
        raise CheckFailed(f"mixture_rollin on {label} called rollin several times for one model ({rollin.calls}): "
                          "one call per model, for all of its states")
    is_student_state = x[:, 0] > 0
    if not torch.allclose(t.to(F64), 1.0 / (1.0 + x[:, 0].abs().to(F64) / 1000.0)):
        raise CheckFailed(f"on {label} your t do not belong to your x_t rows: keep each state with the time "
                          "rollin returned for it (concatenate x_t and t in the same order)")
    if bool((from_student == ~is_student_state).all()):
        raise CheckFailed(f"from_student on {label} is True exactly for the pretrained model's states: it is inverted")
    if not bool((from_student == is_student_state).all()):
        raise CheckFailed(f"from_student on {label} does not say which model made each state ({int((from_student != is_student_state).sum())} "
                          "of the rows are wrong): True for the student's states, False for the pretrained model's")
    return int(is_student_state.sum()), rollin


def check_mixture_rollin(fn: Callable[..., tuple[Tensor, Tensor, Tensor]]) -> None:
    """Run the learner's ``mixture_rollin(rollin, student, pretrained, n, student_fraction)`` with a fake
    ``rollin``; raise :class:`CheckFailed` naming the mistake."""
    n_student, _ = _mixture_case(fn, 8, 0.25, 31)
    if n_student != 2:
        if n_student == 6:
            hint = "you took the fraction from the pretrained model: student_fraction is the STUDENT's share"
        else:
            hint = "take exactly ceil(student_fraction * n) states from the student"
        raise CheckFailed(f"with n = 8 and student_fraction = 0.25 the student should make 2 states, yours made "
                          f"{n_student}. Hint: {hint}")
    passed("shapes, one call per model, the student's share, and labels that match the states")

    counts = {seed: _mixture_case(fn, 10, 0.25, seed)[0] for seed in (41, 42, 43)}
    if len(set(counts.values())) > 1:
        raise CheckFailed(f"with n = 10 and student_fraction = 0.25 the number of student states changes from call "
                          f"to call ({sorted(counts.values())}): the mixture takes a fixed number, ceil(f n) = 3, "
                          "not a random one per state")
    if counts[41] != 3:
        hint = "round() and int() give 2 here; use math.ceil" if counts[41] == 2 else "use math.ceil(f * n)"
        raise CheckFailed(f"with n = 10 and student_fraction = 0.25 the student should make ceil(2.5) = 3 states, "
                          f"yours made {counts[41]}. Hint: {hint}")
    passed("ceil(f n) states from the student, the same number every time")

    for fraction, expected in ((0.0, 0), (1.0, 7)):
        n_student, _ = _mixture_case(fn, 7, fraction, 51)
        if n_student != expected:
            raise CheckFailed(f"with student_fraction = {fraction} the student should make {expected} of 7 states, "
                              f"yours made {n_student}")
    passed("student_fraction = 0 is the pretrained roll-in (off-policy), 1 the student's (on-policy)")
    all_passed("mixture_rollin")


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {
    "soft_optimal_weights": ("boltzlab.finetune.soft_optimal_weights",),
    "policy_gradient_loss": ("boltzlab.finetune.policy_gradient_surrogate",),
    "mixture_rollin": ("boltzlab.finetune.rollin_states",),
}
write_yourself.register(WRITE_YOURSELF)
