"""The chapter 05 check accepts correct estimators and names the mistake in wrong ones."""

from __future__ import annotations

import pytest
import torch

from boltzlab.grading.checks_ch05 import check_mc_score
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted


def _copies(energy, x_t, sigma, eps):
    e, f = energy.energy_and_forces(x_t[:, None, :] + sigma * eps)
    return -e / energy.kT, f


def correct(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    return (torch.softmax(log_w, dim=1)[..., None] * f).sum(1) / energy.kT


def correct_with_logsumexp(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    w = torch.exp(log_w - torch.logsumexp(log_w, dim=1, keepdim=True))
    return torch.einsum("bk,bkd->bd", w, f) / energy.kT


def naive(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    w = torch.exp(log_w)
    return (w[..., None] * f).sum(1) / (w.sum(1, keepdim=True) * energy.kT)


def unnormalised(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    w = torch.exp(log_w - log_w.amax(1, keepdim=True))
    return (w[..., None] * f).sum(1) / energy.kT


def no_kT_on_forces(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    return (torch.softmax(log_w, dim=1)[..., None] * f).sum(1)


def no_kT_in_weights(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    return (torch.softmax(log_w * energy.kT, dim=1)[..., None] * f).sum(1) / energy.kT


def wrong_sign(energy, x_t, sigma, eps):
    return -correct(energy, x_t, sigma, eps)


def jensen(energy, x_t, sigma, eps):
    return _copies(energy, x_t, sigma, eps)[1].mean(1) / energy.kT


def keeps_copies(energy, x_t, sigma, eps):
    log_w, f = _copies(energy, x_t, sigma, eps)
    return torch.softmax(log_w, dim=1)[..., None] * f / energy.kT


@pytest.mark.parametrize("fn", [correct, correct_with_logsumexp])
def test_correct_estimators_pass(fn, capsys):
    check_mc_score(fn)
    assert "All checks passed for mc_score" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (naive, "NaN or inf.*logsumexp"),
    (unnormalised, "do not sum to one"),
    (no_kT_on_forces, "score is F/kT"),
    (no_kT_in_weights, "forgot to divide the energies by kT"),
    (wrong_sign, "sign is flipped"),
    (jensen, "Jensen"),
    (keeps_copies, "shape \\(6, 32, 2\\), expected \\(6, 2\\)"),
])
def test_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_mc_score(fn)


def test_untouched_and_crashing():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_mc_score(untouched)

    def crashes(energy, x_t, sigma, eps):
        return energy.energy_and_forces(x_t[:, :1])

    with pytest.raises(CheckFailed, match="raised"):
        check_mc_score(crashes)
