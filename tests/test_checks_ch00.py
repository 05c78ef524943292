"""The chapter 00 checks accept correct answers and name the mistake in wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.grading.checks_ch00 import _mala_variants, check_kish_ess, check_mala_step
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted


def _variant(name):
    def step(x, energy, tau, xi, log_u):
        return _mala_variants(x, energy, tau, xi, log_u)[name]
    return step


def test_correct_mala_passes(capsys):
    check_mala_step(_variant("correct"))
    assert "All checks passed for mala_step" in capsys.readouterr().out


@pytest.mark.parametrize("name, match", [
    ("no_hastings", "q\\(x\\|y\\)/q\\(y\\|x\\)"),
    ("flipped_hastings", "upside down"),
    ("no_accept_reject", "unadjusted Langevin"),
])
def test_mala_mistakes_are_named(name, match):
    with pytest.raises(CheckFailed, match=match):
        check_mala_step(_variant(name))


def test_mala_other_failures():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_mala_step(untouched)

    def wrong_drift(x, energy, tau, xi, log_u):  # drift with the wrong sign, always accepted
        y = x - tau * energy.forces(x) + math.sqrt(2 * tau) * xi
        return y, torch.ones(x.shape[0], dtype=torch.bool)

    with pytest.raises(CheckFailed, match="MALA proposal"):
        check_mala_step(wrong_drift)

    def float_mask(x, energy, tau, xi, log_u):
        x_new, acc = _mala_variants(x, energy, tau, xi, log_u)["correct"]
        return x_new, acc.double()

    with pytest.raises(CheckFailed, match="bool tensor"):
        check_mala_step(float_mask)

    with pytest.raises(CheckFailed, match="tuple"):
        check_mala_step(lambda x, *a: x)


def _ess(log_w):
    log_w = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def test_kish_ess_checks(capsys):
    check_kish_ess(_ess)
    assert "All checks passed for kish_ess" in capsys.readouterr().out
    naive = lambda lw: float(torch.exp(lw).sum() ** 2 / torch.exp(2 * lw).sum())  # noqa: E731
    with pytest.raises(CheckFailed, match="overflows"):
        check_kish_ess(naive)
    with pytest.raises(CheckFailed, match="not divided by n"):
        check_kish_ess(lambda lw: _ess(lw) / lw.numel())
    with pytest.raises(CheckFailed, match="ESS of 1000 equal weights is 5, expected 1000"):
        check_kish_ess(lambda lw: 5.0)
    with pytest.raises(CheckFailed, match="single number"):
        check_kish_ess(lambda lw: torch.exp(lw))
