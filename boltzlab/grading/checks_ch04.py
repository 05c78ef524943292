"""Checks for the chapter 04 exercises: the denoising-score-matching loss, one Euler-Maruyama
step of the reverse SDE, and Tweedie's denoiser.

Each check calls the learner's function on chosen inputs, compares with an answer computed
here from the equations (not with the package's versions, which the learner must not call:
see ``WRITE_YOURSELF``), and when the answer matches a known mistake says which one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from boltzlab.diffusion import GeometricNoiseSchedule
from boltzlab.energies import GaussianMixture
from boltzlab.estimators import gmm_noised_score, gmm_posterior_mean
from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import (
    CheckFailed,
    all_passed,
    as_float,
    call_learner,
    expect_close,
    expect_shape,
    passed,
)

F64 = torch.float64
ScoreFn = Callable[[Tensor, Tensor], Tensor]
SCHEDULE = GeometricNoiseSchedule(sigma_min=0.01, sigma_max=10.0)


def _checked_score(fn: Callable[[Tensor, Tensor], Tensor]) -> ScoreFn:
    """A score s(x, t) that insists on the documented signature, so a learner who passes a float
    time or a time of the wrong shape is told so instead of getting a broadcasting surprise."""

    def score(x: Tensor, t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            what = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"score(x, t) needs t as a tensor of shape ({x.shape[0]},), one time per row of x; "
                             f"got {what}. Build it with torch.full((x.shape[0],), t)")
        return fn(x, t)

    return score


def _nonlinear_score(x: Tensor, t: Tensor) -> Tensor:
    # a smooth, x- and t-dependent field: evaluating it at the wrong point or time changes the answer
    v = 1.0 + SCHEDULE.variance(t)[:, None]
    return -x / v + 0.3 * torch.sin(x.flip(-1)) * torch.exp(-t)[:, None]


# ----------------------------------------------------------------------------------------
# 1. the DSM loss
# ----------------------------------------------------------------------------------------

DsmLoss = Callable[[ScoreFn, Tensor, Tensor, Tensor, GeometricNoiseSchedule], Tensor]


@torch.no_grad()
def _dsm_variants(score: ScoreFn, x0: Tensor, t: Tensor, eps: Tensor) -> dict[str, float]:
    sigma = SCHEDULE.std(t)[:, None]
    var = SCHEDULE.variance(t)[:, None]
    x_t = x0 + sigma * eps
    s = score(x_t, t)
    return {
        "correct": float((sigma * s + eps).pow(2).sum(-1).mean()),
        "sum_over_batch": float((sigma * s + eps).pow(2).sum()),
        "mean_over_coordinates": float((sigma * s + eps).pow(2).mean()),
        "wrong_sign": float((sigma * s - eps).pow(2).sum(-1).mean()),
        "unweighted": float((s + eps / sigma).pow(2).sum(-1).mean()),
        "variance_for_std": float((sigma * score(x0 + var * eps, t) + eps).pow(2).sum(-1).mean()),
        "score_at_x0": float((sigma * score(x0, t) + eps).pow(2).sum(-1).mean()),
        "no_square": float((sigma * s + eps).norm(dim=-1).mean()),
    }


_DSM_MISTAKES = {
    "sum_over_batch": "you summed over the batch: average the per-sample losses over the B samples (.mean())",
    "mean_over_coordinates": "you averaged over the coordinates too: sum the squared residual over the dim "
    "coordinates, then average over the batch",
    "wrong_sign": "the residual is sigma_t s + eps, not sigma_t s - eps: the target score is -eps / sigma_t "
    "(noise points away from the clean sample, the score points back)",
    "unweighted": "that is the unweighted loss |s + eps / sigma_t|^2; this exercise asks for the sigma_t^2-weighted "
    "one, |sigma_t s + eps|^2, which stays order one at small sigma_t",
    "variance_for_std": "x_t = x_0 + sigma_t eps uses the standard deviation schedule.std(t), not the variance",
    "score_at_x0": "evaluate the score at the noisy point x_t = x_0 + sigma_t eps, not at the clean x_0",
    "no_square": "square the residual's norm: |sigma_t s + eps|^2, not |sigma_t s + eps|",
}


def _name(got: float, variants: dict[str, float], mistakes: dict[str, str], fallback: str) -> str:
    for name, value in variants.items():
        if name != "correct" and math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-9):
            return mistakes[name]
    return fallback


def check_dsm_loss(fn: DsmLoss) -> None:
    """Check ``dsm_loss(score, x0, t, eps, schedule) -> scalar`` on fixed inputs and on the closed form
    for Gaussian data; raise :class:`CheckFailed` naming the mistake."""
    g = torch.Generator().manual_seed(41)
    x0 = torch.randn(64, 3, generator=g, dtype=F64) * 2.0
    t = torch.rand(64, generator=g, dtype=F64) * 0.98 + 0.01
    eps = torch.randn(64, 3, generator=g, dtype=F64)
    weight = torch.ones((), dtype=F64, requires_grad=True)  # stands in for the network's parameters
    score = _checked_score(lambda x, tt: weight * _nonlinear_score(x, tt))
    got = call_learner(fn, score, x0.clone(), t.clone(), eps.clone(), SCHEDULE, name="dsm_loss")
    if isinstance(got, Tensor) and got.numel() != 1:
        raise CheckFailed(f"dsm_loss returned a tensor of shape {tuple(got.shape)}; it should return one number "
                          "(a 0-dim tensor): the per-sample losses averaged over the batch")
    value = as_float("dsm_loss", got.detach() if isinstance(got, Tensor) else got)
    variants = _dsm_variants(score, x0, t, eps)
    if not math.isclose(value, variants["correct"], rel_tol=1e-6, abs_tol=1e-9):
        hint = _name(value, variants, _DSM_MISTAKES,
                     "compute x_t = x0 + sigma_t eps with sigma_t = schedule.std(t), then "
                     "mean over the batch of |sigma_t score(x_t, t) + eps|^2 summed over coordinates")
        expect_close("dsm_loss on 64 samples in 3-D", value, variants["correct"], rtol=1e-6, hint=hint)
    passed("value on fixed (x0, t, eps) with a nonlinear score")
    if not isinstance(got, Tensor) or not got.requires_grad:
        raise CheckFailed("dsm_loss must return a torch.Tensor that keeps the autograd graph (do not call .item() "
                          "or float()): training calls loss.backward() on it")
    passed("returns a tensor that can be back-propagated")

    # Gaussian data N(0, s^2 I) at one sigma: the exact score -x / (s^2 + sigma^2) gives d s^2 / (s^2 + sigma^2)
    s2, sigma, n, d = 1.5, 0.8, 200_000, 2
    x0 = math.sqrt(s2) * torch.randn(n, d, generator=g, dtype=F64)
    eps = torch.randn(n, d, generator=g, dtype=F64)
    t = SCHEDULE.time_at_std(torch.full((n,), sigma, dtype=F64))
    exact = _checked_score(lambda x, tt: -x / (s2 + SCHEDULE.variance(tt))[:, None])
    value = as_float("dsm_loss", call_learner(fn, exact, x0, t, eps, SCHEDULE, name="dsm_loss"))
    expect_close("dsm_loss of the exact score of Gaussian data", value, d * s2 / (s2 + sigma**2), rtol=0.02,
                 hint="with the exact score the loss is the constant C = d s^2 / (s^2 + sigma^2), not 0")
    passed("the exact score of Gaussian data gives the constant C = d s^2 / (s^2 + sigma^2) > 0")
    all_passed("dsm_loss")


# ----------------------------------------------------------------------------------------
# 2. one Euler-Maruyama step of the reverse SDE
# ----------------------------------------------------------------------------------------

SdeStep = Callable[[ScoreFn, GeometricNoiseSchedule, Tensor, float, float, Tensor], Tensor]


def _step_variants(score: ScoreFn, x: Tensor, t: float, dt: float, z: Tensor) -> dict[str, Tensor]:
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    g2 = SCHEDULE.g2(tt)[:, None]
    s = score(x, tt)
    noise = (g2 * dt).sqrt() * z
    return {
        "correct": x + g2 * s * dt + noise,
        "minus_drift": x - g2 * s * dt + noise,
        "half_drift": x + 0.5 * g2 * s * dt + noise,
        "no_sqrt_dt": x + g2 * s * dt + g2.sqrt() * dt * z,
        "g_not_g2": x + g2.sqrt() * s * dt + g2.sqrt() * math.sqrt(dt) * z,
        "score_at_end": x + g2 * score(x, tt - dt) * dt + noise,
        "no_noise": x + g2 * s * dt,
        "variance_as_g2": x + SCHEDULE.variance(tt)[:, None] * s * dt + (SCHEDULE.variance(tt)[:, None] * dt).sqrt() * z,
    }


_STEP_MISTAKES = {
    "minus_drift": "the drift has the wrong sign: going backwards in time the step is x + g(t)^2 s dt "
    "(toward higher density), not x - g(t)^2 s dt",
    "half_drift": "you used the probability-flow drift 1/2 g^2 s with noise: the reverse SDE's drift is the full "
    "g(t)^2 s (half of it comes from the noise the SDE keeps adding)",
    "no_sqrt_dt": "the noise term is g(t) sqrt(dt) z: Brownian increments grow like sqrt(dt), not dt",
    "g_not_g2": "you used g(t) where g(t)^2 belongs: schedule.g2(t) is the squared diffusion coefficient "
    "(drift g^2 s dt, noise sqrt(g^2 dt) z)",
    "score_at_end": "evaluate the score at the current time t (Euler-Maruyama is explicit), not at t - dt",
    "no_noise": "you left out the noise term g(t) sqrt(dt) z: without it this is not the reverse SDE",
    "variance_as_g2": "g(t)^2 is the rate schedule.g2(t), not the accumulated variance schedule.variance(t)",
}


def _name_tensor(got: Tensor, variants: dict[str, Tensor], mistakes: dict[str, str], fallback: str) -> str:
    for name, value in variants.items():
        if name != "correct" and torch.allclose(got.to(F64), value, rtol=1e-6, atol=1e-9):
            return mistakes[name]
    return fallback


def check_reverse_sde_step(fn: SdeStep) -> None:
    """Check ``reverse_sde_step(score, schedule, x, t, dt, z) -> (B, dim)`` on given noise, then that
    200 of its steps with the exact score turn the prior into Gaussian data of the right variance."""
    g = torch.Generator().manual_seed(42)
    x = torch.randn(16, 2, generator=g, dtype=F64) * 3.0
    z = torch.randn(16, 2, generator=g, dtype=F64)
    score = _checked_score(_nonlinear_score)
    for t, dt in ((0.7, 0.05), (0.2, 0.01)):
        got = call_learner(fn, score, SCHEDULE, x.clone(), t, dt, z.clone(), name="reverse_sde_step")
        expect_shape(f"reverse_sde_step at t = {t}", got, x.shape)
        variants = _step_variants(score, x, t, dt, z)
        if not torch.allclose(got.to(F64), variants["correct"], rtol=1e-6, atol=1e-9):
            hint = _name_tensor(got, variants, _STEP_MISTAKES,
                                "x_new = x + g2 s(x, t) dt + sqrt(g2 dt) z with g2 = schedule.g2(t) and t a (B,) tensor")
            expect_close(f"reverse_sde_step at t = {t}, dt = {dt}", got.to(F64), variants["correct"], rtol=1e-6,
                         atol=1e-9, hint=hint)
    passed("one step on given noise, at two times")

    # Gaussian data N(0, s^2 I): the exact score is -x / (s^2 + sigma_t^2); 200 steps from the prior
    s2, n, n_steps = 1.0, 4000, 200
    exact = _checked_score(lambda xx, tt: -xx / (s2 + SCHEDULE.variance(tt))[:, None])
    x = torch.randn(n, 2, generator=g, dtype=F64) * math.sqrt(s2 + SCHEDULE.prior_std**2)
    dt = 1.0 / n_steps
    for k in range(n_steps):
        z = torch.randn(n, 2, generator=g, dtype=F64)
        x = call_learner(fn, exact, SCHEDULE, x, 1.0 - k * dt, dt, z, name="reverse_sde_step")
    var = float(x.var())
    expect_close("the variance after 200 steps from the prior to t = 0 (data variance 1)", var, s2, rtol=0.1,
                 hint="the chain of steps does not turn the prior into the data: check the signs and the powers of g")
    passed(f"200 steps with the exact score end at the data's variance ({var:.3f} for 1)")
    all_passed("reverse_sde_step")


# ----------------------------------------------------------------------------------------
# 3. Tweedie's denoiser
# ----------------------------------------------------------------------------------------

Denoise = Callable[[ScoreFn, Tensor, Tensor, GeometricNoiseSchedule], Tensor]


def _denoise_variants(score: ScoreFn, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
    var = SCHEDULE.variance(t)[:, None]
    s = score(x_t, t)
    return {
        "correct": x_t + var * s,
        "std_not_variance": x_t + var.sqrt() * s,
        "minus": x_t - var * s,
        "g2_not_variance": x_t + SCHEDULE.g2(t)[:, None] * s,
        "no_x_t": var * s,
    }


_DENOISE_MISTAKES = {
    "std_not_variance": "Tweedie's formula multiplies the score by the variance sigma_t^2 (schedule.variance(t)), "
    "not by sigma_t",
    "minus": "the sign is flipped: E[x_0 | x_t] = x_t + sigma_t^2 s; the score points toward the clean data",
    "g2_not_variance": "use the accumulated noise variance sigma_t^2 = schedule.variance(t), not the rate g(t)^2",
    "no_x_t": "you returned only the correction sigma_t^2 s: add it to x_t",
}


def check_denoise(fn: Denoise) -> None:
    """Check ``denoise(score, x_t, t, schedule) -> (B, dim)`` on a nonlinear score and against the exact
    posterior mean of a Gaussian mixture (Bayes' rule, computed without the score)."""
    g = torch.Generator().manual_seed(43)
    x_t = torch.randn(32, 2, generator=g, dtype=F64) * 4.0
    t = torch.rand(32, generator=g, dtype=F64)
    score = _checked_score(_nonlinear_score)
    got = call_learner(fn, score, x_t.clone(), t.clone(), SCHEDULE, name="denoise")
    expect_shape("denoise", got, x_t.shape)
    variants = _denoise_variants(score, x_t, t)
    if not torch.allclose(got.to(F64), variants["correct"], rtol=1e-6, atol=1e-9):
        hint = _name_tensor(got, variants, _DENOISE_MISTAKES,
                            "add sigma_t^2 s(x_t, t) to x_t, with sigma_t^2 = schedule.variance(t) given a trailing "
                            "axis so it multiplies every coordinate of its row")
        expect_close("denoise", got.to(F64), variants["correct"], rtol=1e-6, atol=1e-9, hint=hint)
    passed("x_t + sigma_t^2 s(x_t, t) with a (B,) time")

    mixture = GaussianMixture(name="three", dim=2, means=torch.tensor([[-4.0, 0.0], [3.0, 2.0], [0.0, -5.0]]), std=1.0)
    exact = _checked_score(lambda xx, tt: gmm_noised_score(mixture, xx, SCHEDULE.std(tt)))
    t = torch.full((200,), 0.8, dtype=F64)
    x_t = mixture.sample(200, g, dtype=F64) + SCHEDULE.std(t)[:, None] * torch.randn(200, 2, generator=g, dtype=F64)
    got = call_learner(fn, exact, x_t, t, SCHEDULE, name="denoise")
    expect_close("denoise with the exact score vs Bayes' posterior mean", got, gmm_posterior_mean(mixture, x_t, SCHEDULE.std(t)),
                 rtol=1e-6, atol=1e-8)
    passed("with the exact score of a mixture it equals the posterior mean E[x_0 | x_t] from Bayes' rule")
    all_passed("denoise")


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {
    "dsm_loss": ("boltzlab.diffusion.dsm_loss", "boltzlab.diffusion.denoising_score_matching_loss"),
    "reverse_sde_step": ("boltzlab.diffusion.reverse_sde_step", "boltzlab.diffusion.reverse_sde_sample"),
    "denoise": ("boltzlab.diffusion.tweedie_denoise", "boltzlab.estimators.gmm_posterior_mean"),
}
write_yourself.register(WRITE_YOURSELF)
