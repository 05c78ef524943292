"""The chapter 04 checks accept correct answers and name the mistake in wrong ones."""

from __future__ import annotations

import pytest
import torch

from boltzlab.grading.checks_ch04 import (
    check_denoise,
    check_dsm_loss,
    check_reverse_sde_step,
)
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

# ---------------------------------------------------------------- DSM loss


def dsm_correct(score, x0, t, eps, schedule):
    sigma = schedule.std(t)[:, None]
    return (sigma * score(x0 + sigma * eps, t) + eps).pow(2).sum(-1).mean()


def dsm_einsum(score, x0, t, eps, schedule):
    sigma = schedule.variance(t).sqrt().unsqueeze(-1)
    r = sigma * score(x0 + sigma * eps, t) + eps
    return torch.einsum("bd,bd->b", r, r).mean()


def dsm_sum(score, x0, t, eps, schedule):
    return dsm_correct(score, x0, t, eps, schedule) * x0.shape[0]


def dsm_wrong_sign(score, x0, t, eps, schedule):
    sigma = schedule.std(t)[:, None]
    return (sigma * score(x0 + sigma * eps, t) - eps).pow(2).sum(-1).mean()


def dsm_unweighted(score, x0, t, eps, schedule):
    sigma = schedule.std(t)[:, None]
    return (score(x0 + sigma * eps, t) + eps / sigma).pow(2).sum(-1).mean()


def dsm_at_x0(score, x0, t, eps, schedule):
    sigma = schedule.std(t)[:, None]
    return (sigma * score(x0, t) + eps).pow(2).sum(-1).mean()


def dsm_item(score, x0, t, eps, schedule):
    return dsm_correct(score, x0, t, eps, schedule).item()


def dsm_per_sample(score, x0, t, eps, schedule):
    sigma = schedule.std(t)[:, None]
    return (sigma * score(x0 + sigma * eps, t) + eps).pow(2).sum(-1)


def dsm_calls_package(score, x0, t, eps, schedule):
    from boltzlab.diffusion import dsm_loss

    return dsm_loss(score, x0, t, eps, schedule)


def untouched(*args):
    raise NotImplementedError()


def test_dsm_loss_accepts_correct(capsys):
    for fn in (dsm_correct, dsm_einsum):
        check_dsm_loss(fn)
    assert capsys.readouterr().out.count("All checks passed for dsm_loss") == 2


@pytest.mark.parametrize("fn, match", [
    (dsm_sum, "summed over the batch"),
    (dsm_wrong_sign, "not sigma_t s - eps"),
    (dsm_unweighted, "unweighted loss"),
    (dsm_at_x0, "noisy point x_t"),
    (dsm_item, "keeps the autograd graph"),
    (dsm_per_sample, "shape \\(64,\\).*one number"),
    (dsm_calls_package, "write it yourself|calls boltzlab.diffusion.dsm_loss"),
])
def test_dsm_loss_names_mistakes(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_dsm_loss(fn)


def test_dsm_loss_untouched_is_not_attempted():
    with pytest.raises(ExerciseNotAttempted):
        check_dsm_loss(untouched)


# ---------------------------------------------------------------- reverse SDE step


def step_correct(score, schedule, x, t, dt, z):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    g2 = schedule.g2(tt)[:, None]
    return x + g2 * score(x, tt) * dt + (g2 * dt).sqrt() * z


def step_minus(score, schedule, x, t, dt, z):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    g2 = schedule.g2(tt)[:, None]
    return x - g2 * score(x, tt) * dt + (g2 * dt).sqrt() * z


def step_half(score, schedule, x, t, dt, z):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    g2 = schedule.g2(tt)[:, None]
    return x + 0.5 * g2 * score(x, tt) * dt + (g2 * dt).sqrt() * z


def step_dt_noise(score, schedule, x, t, dt, z):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    g2 = schedule.g2(tt)[:, None]
    return x + g2 * score(x, tt) * dt + g2.sqrt() * dt * z


def step_g(score, schedule, x, t, dt, z):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    g = schedule.g(tt)[:, None]
    return x + g * score(x, tt) * dt + g * dt**0.5 * z


def step_no_noise(score, schedule, x, t, dt, z):
    tt = torch.full((x.shape[0],), t, dtype=x.dtype)
    return x + schedule.g2(tt)[:, None] * score(x, tt) * dt


def step_float_time(score, schedule, x, t, dt, z):
    g2 = schedule.g2(torch.tensor(t))
    return x + g2 * score(x, t) * dt + (g2 * dt).sqrt() * z


def test_reverse_sde_step_accepts_correct(capsys):
    check_reverse_sde_step(step_correct)
    assert "All checks passed for reverse_sde_step" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (step_minus, "wrong sign"),
    (step_half, "probability-flow drift"),
    (step_dt_noise, "sqrt\\(dt\\)"),
    (step_g, "g\\(t\\) where g\\(t\\)\\^2 belongs"),
    (step_no_noise, "left out the noise"),
    (step_float_time, "needs t as a tensor of shape \\(16,\\)"),
])
def test_reverse_sde_step_names_mistakes(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_reverse_sde_step(fn)


# ---------------------------------------------------------------- Tweedie


def denoise_correct(score, x_t, t, schedule):
    return x_t + schedule.variance(t)[:, None] * score(x_t, t)


def denoise_std(score, x_t, t, schedule):
    return x_t + schedule.std(t)[:, None] * score(x_t, t)


def denoise_minus(score, x_t, t, schedule):
    return x_t - schedule.variance(t)[:, None] * score(x_t, t)


def denoise_no_x(score, x_t, t, schedule):
    return schedule.variance(t)[:, None] * score(x_t, t)


def denoise_no_broadcast(score, x_t, t, schedule):
    return x_t + schedule.variance(t) * score(x_t, t)


def test_denoise_accepts_correct(capsys):
    check_denoise(denoise_correct)
    assert "All checks passed for denoise" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (denoise_std, "variance sigma_t\\^2"),
    (denoise_minus, "sign is flipped"),
    (denoise_no_x, "add it to x_t"),
    (denoise_no_broadcast, "raised RuntimeError"),
])
def test_denoise_names_mistakes(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_denoise(fn)


def step_calls_package(score, schedule, x, t, dt, z):
    from boltzlab.diffusion import reverse_sde_step

    return reverse_sde_step(score, schedule, x, t, dt, z)


def denoise_calls_package(score, x_t, t, schedule):
    from boltzlab.diffusion import tweedie_denoise

    return tweedie_denoise(x_t, score(x_t, t), schedule.std(t))


@pytest.mark.parametrize("check, fn, name", [
    (check_reverse_sde_step, step_calls_package, "reverse_sde_step"),
    (check_denoise, denoise_calls_package, "tweedie_denoise"),
])
def test_package_versions_do_not_count(check, fn, name):
    with pytest.raises(CheckFailed, match=f"does not count.*boltzlab.diffusion.{name}"):
        check(fn)
