"""The chapter 07 checks accept correct answers and name the mistake in wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.grading.checks_ch07 import check_bar_free_energy, check_log_z_bootstrap
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

softplus = torch.nn.functional.softplus


# ----------------------------------------------------------------------------------------
# BAR
# ----------------------------------------------------------------------------------------


def _bisect(g, lo=-2000.0, hi=2000.0, iters=200):
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def _bar(du0, du1, m):
    return _bisect(lambda df: float(torch.logsumexp(-softplus(m + du0 - df), 0)
                                    - torch.logsumexp(-softplus(-m - du1 + df), 0)))


def bar_correct(du0, du1):
    return _bar(du0.double(), du1.double(), math.log(du0.numel() / du1.numel()))


def bar_scipy(du0, du1):
    """Another formulation: Bennett's constant C = ΔF - M solves Σ f(du0 - C) = Σ f(C - du1),
    found by scipy's brentq with log f(z) = -logaddexp(0, z); returns a 0-d tensor."""
    from scipy.optimize import brentq

    zero = torch.zeros((), dtype=torch.float64)

    def h(c: float) -> float:
        left = torch.logsumexp(-torch.logaddexp(zero, du0 - c), 0)
        right = torch.logsumexp(-torch.logaddexp(zero, c - du1), 0)
        return float(left - right)

    c = brentq(h, -3000.0, 3000.0, xtol=1e-13, rtol=1e-15)
    return torch.tensor(c + math.log(du0.numel() / du1.numel()), dtype=torch.float64)


def bar_naive(du0, du1):
    m = math.log(du0.numel() / du1.numel())
    return _bisect(lambda df: float(torch.log((1 / (1 + torch.exp(m + du0 - df))).sum())
                                    - torch.log((1 / (1 + torch.exp(-m - du1 + df))).sum())), -50.0, 50.0)


def bar_sign(du0, du1):
    return -bar_correct(du0, du1)


def bar_no_m(du0, du1):
    return _bar(du0.double(), du1.double(), 0.0)


def bar_m_flipped(du0, du1):
    return _bar(du0.double(), du1.double(), math.log(du1.numel() / du0.numel()))


def fep_forward(du0, du1):
    return -(torch.logsumexp(-du0, 0) - math.log(du0.numel()))


def fep_reverse(du0, du1):
    return torch.logsumexp(du1, 0) - math.log(du1.numel())


def bar_coarse(du0, du1):
    """Stops bisecting far too early."""
    m = math.log(du0.numel() / du1.numel())
    return _bisect(lambda df: float(torch.logsumexp(-softplus(m + du0 - df), 0)
                                    - torch.logsumexp(-softplus(-m - du1 + df), 0)), -1.0, 7.0, iters=5)


@pytest.mark.parametrize("fn", [bar_correct, bar_scipy])
def test_correct_bar_passes(fn, capsys):
    check_bar_free_energy(fn)
    assert "All checks passed for bar_free_energy" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (bar_sign, "sign is flipped"),
    (fep_forward, "forward FEP"),
    (fep_reverse, "reverse FEP"),
    (bar_no_m, "left out M"),
    (bar_m_flipped, "M has the wrong sign"),
    (bar_naive, "overflow"),
    (bar_coarse, "off by"),
])
def test_bar_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_bar_free_energy(fn)


# ----------------------------------------------------------------------------------------
# bootstrap
# ----------------------------------------------------------------------------------------


def boot_correct(log_w, n_boot, generator):
    n = log_w.numel()
    lw = log_w.double()
    reps = torch.logsumexp(lw[torch.randint(n, (n_boot, n), generator=generator)], 1) - math.log(n)
    q = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(torch.logsumexp(lw, 0)) - math.log(n), float(reps.std()), float(q[0]), float(q[1])


def boot_multinomial_loop(log_w, n_boot, generator):
    """A loop with counts from a multinomial: the same bootstrap, written differently; tensors out."""
    n = log_w.numel()
    lw = log_w.double()
    reps = []
    for _ in range(n_boot):
        counts = torch.multinomial(torch.ones(n), n, replacement=True, generator=generator).bincount(minlength=n)
        keep = counts > 0
        reps.append(torch.logsumexp(lw[keep] + counts[keep].double().log(), 0) - math.log(n))
    reps = torch.stack(reps)
    est = torch.logsumexp(lw, 0) - math.log(n)
    s = reps.sort().values
    return est, reps.std(), s[int(0.025 * n_boot)], s[int(0.975 * n_boot) - 1]


def boot_permutation(log_w, n_boot, generator):
    n = log_w.numel()
    reps = torch.stack([torch.logsumexp(log_w.double()[torch.randperm(n, generator=generator)], 0) - math.log(n)
                        for _ in range(n_boot)])
    est = float(torch.logsumexp(log_w.double(), 0)) - math.log(n)
    return est, float(reps.std()), est - 1.96 * float(reps.std()), est + 1.96 * float(reps.std())


def boot_sum(log_w, n_boot, generator):
    est, se, lo, hi = boot_correct(log_w, n_boot, generator)
    return est + math.log(log_w.numel()), se, lo, hi


def boot_mean_log(log_w, n_boot, generator):
    _, se, lo, hi = boot_correct(log_w, n_boot, generator)
    return float(log_w.double().mean()), se, lo, hi


def boot_naive_se(log_w, n_boot, generator):
    est, _, lo, hi = boot_correct(log_w, n_boot, generator)
    return est, float(log_w.double().std()) / math.sqrt(log_w.numel()), lo, hi


def boot_half(log_w, n_boot, generator):
    n = log_w.numel()
    lw = log_w.double()
    reps = torch.logsumexp(lw[torch.randint(n, (n_boot, n // 2), generator=generator)], 1) - math.log(n // 2)
    q = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(torch.logsumexp(lw, 0)) - math.log(n), float(reps.std()), float(q[0]), float(q[1])


def boot_no_generator(log_w, n_boot, generator):
    return boot_correct(log_w, n_boot, None)


def boot_overflow(log_w, n_boot, generator):
    n = log_w.numel()
    w = log_w.double().exp()
    reps = torch.log(w[torch.randint(n, (n_boot, n), generator=generator)].mean(1))
    q = torch.quantile(reps, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(torch.log(w.mean())), float(reps.std()), float(q[0]), float(q[1])


def boot_swapped(log_w, n_boot, generator):
    est, se, lo, hi = boot_correct(log_w, n_boot, generator)
    return se, est, lo, hi


def boot_three(log_w, n_boot, generator):
    return boot_correct(log_w, n_boot, generator)[:3]


@pytest.mark.parametrize("fn", [boot_correct, boot_multinomial_loop])
def test_correct_bootstrap_passes(fn, capsys):
    check_log_z_bootstrap(fn)
    assert "All checks passed for log_z_bootstrap" in capsys.readouterr().out


@pytest.mark.parametrize("fn, match", [
    (boot_permutation, "WITH replacement"),
    (boot_sum, "subtract log n"),
    (boot_mean_log, "mean of log w"),
    (boot_naive_se, "sd\\(log w\\)/sqrt\\(n\\)"),
    (boot_half, "sqrt\\(2\\)"),
    (boot_no_generator, "generator=generator"),
    (boot_overflow, "overflows"),
    (boot_swapped, "log Ẑ of 50 equal log-weights"),
    (boot_three, "four numbers"),
])
def test_bootstrap_mistakes_are_named(fn, match):
    with pytest.raises(CheckFailed, match=match):
        check_log_z_bootstrap(fn)


def test_untouched_and_crashing():
    def untouched(*args):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_bar_free_energy(untouched)
    with pytest.raises(ExerciseNotAttempted):
        check_log_z_bootstrap(untouched)

    def crashes(log_w, n_boot, generator):
        return log_w[n_boot * 1000]

    with pytest.raises(CheckFailed, match="raised IndexError"):
        check_log_z_bootstrap(crashes)
