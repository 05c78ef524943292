"""The chapter 02 and 03 exercise checks: a correct solution passes, and each usual mistake
fails with a message that names it."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.grading import checks_ch02 as C2
from boltzlab.grading import checks_ch03 as C3
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted




def not_attempted(*args, **kwargs):
    raise NotImplementedError()


# ----------------------------------------------------------------------------- affine coupling


def coupling_correct(x, mask, net):
    s, t = net(x * mask)
    return x * mask + (1 - mask) * (x * torch.exp(s) + t), ((1 - mask) * s).sum(-1)


def coupling_sees_all_of_x(x, mask, net):
    s, t = net(x)
    return x * mask + (1 - mask) * (x * torch.exp(s) + t), ((1 - mask) * s).sum(-1)


def coupling_mask_swapped(x, mask, net):
    s, t = net(x * mask)
    return x * (1 - mask) + mask * (x * torch.exp(s) + t), (mask * s).sum(-1)


def coupling_scale_not_exponentiated(x, mask, net):
    s, t = net(x * mask)
    return x * mask + (1 - mask) * (x * s + t), ((1 - mask) * s).sum(-1)


def coupling_logdet_over_all_dims(x, mask, net):
    y, _ = coupling_correct(x, mask, net)
    return y, net(x * mask)[0].sum(-1)


def coupling_logdet_not_summed(x, mask, net):
    s, t = net(x * mask)
    return x * mask + (1 - mask) * (x * torch.exp(s) + t), (1 - mask) * s


def coupling_logdet_sign(x, mask, net):
    y, ld = coupling_correct(x, mask, net)
    return y, -ld


def coupling_returns_y_only(x, mask, net):
    return coupling_correct(x, mask, net)[0]


def test_affine_coupling_check_passes_a_correct_solution(capsys):
    C2.check_affine_coupling_forward(coupling_correct)
    out = capsys.readouterr().out
    assert "All checks passed for affine_coupling_forward" in out and "autograd" in out


@pytest.mark.parametrize("wrong, message", [
    (coupling_sees_all_of_x, "network sees all of x: pass it x \\* mask"),
    (coupling_mask_swapped, "applied where mask == 1"),
    (coupling_scale_not_exponentiated, "scaled by s instead of exp\\(s\\)"),
    (coupling_logdet_over_all_dims, "sums s over all dimensions"),
    (coupling_logdet_not_summed, r"logdet has shape \(7, 2\), one number per dimension"),
    (coupling_logdet_sign, "log\\|det\\| has the wrong sign"),
    (coupling_returns_y_only, "should return a tuple \\(y, logdet\\)"),
])
def test_affine_coupling_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        C2.check_affine_coupling_forward(wrong)


def test_affine_coupling_check_reports_an_untouched_exercise_and_a_crash():
    with pytest.raises(ExerciseNotAttempted, match="still raises NotImplementedError"):
        C2.check_affine_coupling_forward(not_attempted)
    with pytest.raises(CheckFailed, match="raised ZeroDivisionError"):
        C2.check_affine_coupling_forward(lambda x, mask, net: 1 / 0)


# ----------------------------------------------------------------------------- flow log-density


def log_prob_correct(x, inverse):
    z, logdet = inverse(x)
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi) + logdet


def log_prob_no_constant(x, inverse):
    z, logdet = inverse(x)
    return -0.5 * (z**2).sum(-1) + logdet


def log_prob_d_is_two(x, inverse):
    z, logdet = inverse(x)
    return -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) + logdet


def log_prob_minus_logdet(x, inverse):
    z, logdet = inverse(x)
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi) - logdet


def log_prob_no_logdet(x, inverse):
    z, _ = inverse(x)
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def log_prob_per_dimension(x, inverse):
    z, logdet = inverse(x)
    return -0.5 * z**2 - 0.5 * math.log(2 * math.pi) + logdet[:, None] / z.shape[-1]


def log_prob_averaged(x, inverse):
    return log_prob_correct(x, inverse).mean()


def test_flow_log_prob_check_passes_a_correct_solution(capsys):
    C2.check_flow_log_prob(log_prob_correct)
    out = capsys.readouterr().out
    assert "All checks passed for flow_log_prob" in out and "integrates to 1.000" in out


@pytest.mark.parametrize("wrong, message", [
    (log_prob_no_constant, "normalising constant -\\(d/2\\) log 2π is missing"),
    (log_prob_d_is_two, "d = 2 was hard-coded"),
    (log_prob_minus_logdet, "log-determinant has the wrong sign"),
    (log_prob_no_logdet, "log-determinant is missing"),
    (log_prob_per_dimension, "one value per dimension"),
    (log_prob_averaged, "returned a single number"),
])
def test_flow_log_prob_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        C2.check_flow_log_prob(wrong)


# ----------------------------------------------------------------------------- reverse KL loss


def kl_correct(flow, energy, n_samples, generator):
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.energy(x) / energy.kT + log_q).mean()


def kl_no_kT(flow, energy, n_samples, generator):
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.energy(x) + log_q).mean()


def kl_minus_log_q(flow, energy, n_samples, generator):
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.energy(x) / energy.kT - log_q).mean()


def kl_uses_log_prob(flow, energy, n_samples, generator):
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.log_prob(x) + log_q).mean()


def kl_summed(flow, energy, n_samples, generator):
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.energy(x) / energy.kT + log_q).sum()


def kl_no_grad(flow, energy, n_samples, generator):
    with torch.no_grad():
        return kl_correct(flow, energy, n_samples, generator)


def kl_as_float(flow, energy, n_samples, generator):
    return kl_correct(flow, energy, n_samples, generator).item()


def kl_detached_samples(flow, energy, n_samples, generator):
    # a subtle one: the value is right, but no gradient reaches the flow through x
    x, log_q = flow.sample(n_samples, generator=generator)
    return (energy.energy(x.detach()) / energy.kT + log_q).mean()


def test_reverse_kl_check_passes_a_correct_solution(capsys):
    C3.check_reverse_kl_loss(kl_correct)
    out = capsys.readouterr().out
    assert "All checks passed for reverse_kl_loss" in out and "from quadrature" in out


@pytest.mark.parametrize("wrong, message", [
    (kl_no_kT, "not divided by kT"),
    (kl_minus_log_q, "log q has the wrong sign"),
    (kl_uses_log_prob, "energy.log_prob\\(x\\) is -E/kT"),
    (kl_summed, "you summed over the samples"),
    (kl_no_grad, "has no gradient"),
    (kl_as_float, "returned a float; return the loss as a torch tensor"),
    (kl_detached_samples, "gradient of your loss w.r.t."),
])
def test_reverse_kl_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        C3.check_reverse_kl_loss(wrong)


# ----------------------------------------------------------------------------- free energy


def df_correct(log_w, in_a, in_b):
    return torch.logsumexp(log_w[in_a], 0) - torch.logsumexp(log_w[in_b], 0)


def df_sign(log_w, in_a, in_b):
    return -df_correct(log_w, in_a, in_b)


def df_counts(log_w, in_a, in_b):
    return -math.log(float(in_b.sum()) / float(in_a.sum()))


def df_means(log_w, in_a, in_b):
    w = log_w.exp()
    return -torch.log(w[in_b].mean() / w[in_a].mean())


def df_overflows(log_w, in_a, in_b):
    w = log_w.exp()
    return -torch.log(w[in_b].sum() / w[in_a].sum())


def test_free_energy_check_passes_a_correct_solution(capsys):
    C3.check_free_energy_difference(df_correct)
    out = capsys.readouterr().out
    assert "All checks passed for free_energy_difference" in out and "exact 3.38" in out


@pytest.mark.parametrize("wrong, message", [
    (df_sign, "sign is flipped"),
    (df_counts, "weights are ignored"),
    (df_means, "averaged the weights in each state"),
    (df_overflows, "over- or underflows. Work in log space"),
])
def test_free_energy_check_names_the_mistake(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        C3.check_free_energy_difference(wrong)


def test_free_energy_check_reports_an_untouched_exercise():
    with pytest.raises(ExerciseNotAttempted):
        C3.check_free_energy_difference(not_attempted)
