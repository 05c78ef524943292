"""The chapter 01 checks accept correct solutions and name the mistake in wrong ones."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.grading.checks_ch01 import check_elbo_estimate, check_gradient_penalty
from boltzlab.grading.feedback import CheckFailed, ExerciseNotAttempted

LOG_2PI = math.log(2 * math.pi)


# ----------------------------------------------------------------------------- the ELBO


def make_elbo(std_power: float = 0.5, kl_sign: float = -1.0, constant: bool = True, use_var: bool = True,
              detach_z: bool = False, reduce: str = "sum", use_eps: bool = True):
    """An ELBO implementation with one knob per classic mistake (the defaults are correct)."""

    def elbo_estimate(x, encoder, decoder, eps):
        mu, log_var = encoder(x)
        z = mu + torch.exp(std_power * log_var) * (eps if use_eps else 0.0)
        if detach_z:
            z = z.detach()
        mean, dec_log_var = decoder(z)
        if use_var:
            terms = (x - mean) ** 2 * torch.exp(-dec_log_var) + dec_log_var + (LOG_2PI if constant else 0.0)
        else:
            terms = (x - mean) ** 2
        kl = 0.5 * (mu**2 + torch.exp(log_var) - 1 - log_var)
        if reduce == "sum":
            return -0.5 * terms.sum(-1) + kl_sign * kl.sum(-1)
        if reduce == "mean_coords":
            return -0.5 * terms.mean(-1) + kl_sign * kl.mean(-1)
        return (-0.5 * terms.sum(-1) + kl_sign * kl.sum(-1)).mean()

    return elbo_estimate


def test_correct_elbo_passes(capsys):
    check_elbo_estimate(make_elbo())
    assert "All checks passed for elbo_estimate" in capsys.readouterr().out


def test_elbo_via_torch_distributions_passes():
    from torch.distributions import Normal, kl_divergence

    def elbo_estimate(x, encoder, decoder, eps):
        mu, log_var = encoder(x)
        q = Normal(mu, torch.exp(0.5 * log_var))
        z = q.rsample() * 0 + mu + q.scale * eps
        mean, dec_log_var = decoder(z)
        rec = Normal(mean, torch.exp(0.5 * dec_log_var)).log_prob(x).sum(-1)
        return rec - kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(-1)

    check_elbo_estimate(elbo_estimate)


@pytest.mark.parametrize("wrong, message", [
    (make_elbo(kl_sign=+1.0), "KL term is added instead of subtracted"),
    (make_elbo(std_power=1.0), "exp(log_var) as the standard deviation"),
    (make_elbo(use_eps=False), "ignores the noise eps"),
    (make_elbo(constant=False), "log(2π)"),
    (make_elbo(use_var=False), "ignores the decoder's variance"),
    (make_elbo(reduce="mean_coords"), "averaged over coordinates"),
    (make_elbo(reduce="batch_mean"), "single number for a batch of 6"),
    (make_elbo(detach_z=True), "reparameterisation trick"),
])
def test_wrong_elbo_is_named(wrong, message):
    with pytest.raises(CheckFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_elbo_estimate(wrong)


def test_elbo_without_gradients_and_untouched_exercise():
    def no_grad_elbo(x, encoder, decoder, eps):
        with torch.no_grad():
            return make_elbo()(x, encoder, decoder, eps)

    with pytest.raises(CheckFailed, match="not connected to the encoder's parameters"):
        check_elbo_estimate(no_grad_elbo)

    def untouched(x, encoder, decoder, eps):
        raise NotImplementedError()

    with pytest.raises(ExerciseNotAttempted):
        check_elbo_estimate(untouched)

    def crashes(x, encoder, decoder, eps):
        return x @ eps.T @ torch.ones(3)

    with pytest.raises(CheckFailed, match="raised RuntimeError"):
        check_elbo_estimate(crashes)


def test_unrecognised_wrong_elbo_gets_the_generic_message():
    def off_by_one(x, encoder, decoder, eps):
        return make_elbo()(x, encoder, decoder, eps) + 1.0

    with pytest.raises(CheckFailed, match="is off at 6 of 6 entries.*Hint: ELBO ="):
        check_elbo_estimate(off_by_one)


# ----------------------------------------------------------------------------- the gradient penalty


def make_gp(norm: str = "l2", target: float = 1.0, where: str = "interpolate", one_sided: bool = False,
            reduce: str = "mean", create_graph: bool = True, norm_dim: int = -1):
    """A gradient penalty with one knob per classic mistake (the defaults are correct)."""

    def gradient_penalty(critic, real, fake, t):
        points = {"interpolate": t * real + (1 - t) * fake, "swapped": t * fake + (1 - t) * real,
                  "real": real, "fake": fake}[where]
        x_hat = points.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=create_graph)
        size = grad.norm(dim=norm_dim) if norm == "l2" else (grad**2).sum(-1)
        excess = size - target
        if one_sided:
            excess = torch.relu(excess)
        penalty = excess**2
        return penalty.mean() if reduce == "mean" else penalty.sum()

    return gradient_penalty


def test_correct_gradient_penalty_passes(capsys):
    check_gradient_penalty(make_gp())
    assert "All checks passed for gradient_penalty" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (make_gp(norm="squared"), "squared gradient norm"),
    (make_gp(target=0.0), r"no '- 1'"),
    (make_gp(where="swapped"), "real and fake are swapped"),
    (make_gp(where="real"), "at the real samples only"),
    (make_gp(where="fake"), "at the fake samples only"),
    (make_gp(one_sided=True), "one-sided"),
    (make_gp(reduce="sum"), "sums over the batch"),
    (make_gp(norm_dim=0), "over the batch dimension"),
    (make_gp(create_graph=False), "create_graph=True"),
])
def test_wrong_gradient_penalty_is_named(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_gradient_penalty(wrong)


def test_gradient_penalty_returning_a_float_is_refused():
    def as_float(critic, real, fake, t):
        return make_gp()(critic, real, fake, t).item()

    with pytest.raises(CheckFailed, match="should return a torch.Tensor"):
        check_gradient_penalty(as_float)
