r"""Checks for the exercises of chapter 01 (``solutions/01_vae_gan.ipynb``).

- :func:`check_elbo_estimate`: the one-sample ELBO with the reparameterisation trick,
  ``elbo_estimate(x, encoder, decoder, eps) -> (B,)``.
- :func:`check_gradient_penalty`: the WGAN-GP penalty,
  ``gradient_penalty(critic, real, fake, t) -> scalar``.

Each check compares the learner's function with :mod:`boltzlab.training` on small
networks in float64, and when the value is wrong it compares it with the usual mistakes
(KL added, σ = exp(log σ²), the 2π constant dropped, squared gradient norm, real and fake
swapped, ...) so that the message names the mistake, not just the difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from boltzlab.grading import write_yourself
from boltzlab.grading.feedback import (
    CheckFailed,
    all_passed,
    as_float,
    call_learner,
    expect_close,
    expect_finite,
    expect_shape,
    passed,
)
from boltzlab.models import Critic, GaussianDecoder, GaussianEncoder
from boltzlab.training import gaussian_kl_to_standard, gradient_penalty

__all__ = ["check_elbo_estimate", "check_gradient_penalty"]

LOG_2PI = math.log(2 * math.pi)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _first_match(got: Tensor, candidates: dict[str, Tensor], rtol: float = 1e-6, atol: float = 1e-8) -> str | None:
    """The description of the first candidate that ``got`` equals, if any."""
    for description, value in candidates.items():
        if got.shape == value.shape and torch.allclose(got, value, rtol=rtol, atol=atol):
            return description
    return None


# ----------------------------------------------------------------------------------------
# exercise 1: the ELBO
# ----------------------------------------------------------------------------------------


def _elbo_problem(x_dim: int, z_dim: int, batch: int, seed: int) -> tuple[Tensor, GaussianEncoder, GaussianDecoder, Tensor]:
    encoder = GaussianEncoder(x_dim, z_dim, hidden=(8,), seed=seed).double()
    decoder = GaussianDecoder(z_dim, x_dim, hidden=(8,), seed=seed + 1).double()
    with torch.no_grad():
        decoder.log_var.copy_(torch.linspace(-1.0, 0.7, x_dim, dtype=torch.float64))
    g = _generator(seed + 2)
    x = 1.5 * torch.randn(batch, x_dim, generator=g, dtype=torch.float64)
    eps = torch.randn(batch, z_dim, generator=g, dtype=torch.float64)
    return x, encoder, decoder, eps


def _gaussian_log_density(x: Tensor, mean: Tensor, log_var: Tensor, constant: bool = True) -> Tensor:
    terms = (x - mean) ** 2 * torch.exp(-log_var) + log_var + (LOG_2PI if constant else 0.0)
    return -0.5 * terms.sum(-1)


def _elbo_variants(x: Tensor, encoder: GaussianEncoder, decoder: GaussianDecoder, eps: Tensor) -> dict[str, Tensor]:
    """The correct ELBO (key "correct") and the values of common mistakes, with their diagnosis."""
    with torch.no_grad():
        mu, log_var = encoder(x)
        kl = gaussian_kl_to_standard(mu, log_var).sum(-1)

        def rec(z: Tensor, constant: bool = True) -> Tensor:
            mean, dec_log_var = decoder(z)
            return _gaussian_log_density(x, mean, dec_log_var, constant)

        z = mu + eps * (0.5 * log_var).exp()
        mean, dec_log_var = decoder(z)  # the decoder's Gaussian, for the mistakes below
        r = rec(z)
        return {
            "correct": r - kl,
            "the KL term is added instead of subtracted (ELBO = E_q[log p(x|z)] - KL)": r + kl,
            "the KL term is missing": r,
            "z uses exp(log_var) as the standard deviation; it is exp(log_var / 2) = exp(0.5 * log_var)":
                rec(mu + torch.exp(log_var) * eps) - kl,
            "z = mu ignores the noise eps: the reparameterisation is z = mu + exp(0.5 * log_var) * eps": rec(mu) - kl,
            "the constant -1/2 log(2π) per data coordinate is missing from log p(x|z)": rec(z, constant=False) - kl,
            "log p(x|z) ignores the decoder's variance (it looks like a plain squared error)":
                -0.5 * ((x - mean) ** 2).sum(-1) - kl,
            "the terms are averaged over coordinates instead of summed":
                -0.5 * ((x - mean) ** 2 * torch.exp(-dec_log_var) + dec_log_var + LOG_2PI).mean(-1)
                - gaussian_kl_to_standard(mu, log_var).mean(-1),
            "the KL term is averaged over latent dimensions instead of summed":
                r - gaussian_kl_to_standard(mu, log_var).mean(-1),
        }


def _reference_gradients(x: Tensor, encoder: GaussianEncoder, decoder: GaussianDecoder, eps: Tensor) -> list[Tensor]:
    q_mean, q_log_var = encoder(x)
    latent = q_mean + eps * (0.5 * q_log_var).exp()
    value = (_gaussian_log_density(x, *decoder(latent)) - gaussian_kl_to_standard(q_mean, q_log_var).sum(-1)).sum()
    return list(torch.autograd.grad(value, list(encoder.parameters())))


def _check_elbo_case(fn: Callable[..., Any], x_dim: int, z_dim: int, batch: int, seed: int) -> None:
    x, encoder, decoder, eps = _elbo_problem(x_dim, z_dim, batch, seed)
    variants = _elbo_variants(x, encoder, decoder, eps)
    got = call_learner(fn, x, encoder, decoder, eps, name="elbo_estimate")
    if isinstance(got, Tensor) and got.numel() == 1 and batch > 1:
        raise CheckFailed(
            f"elbo_estimate returned a single number for a batch of {batch}; it should return one ELBO "
            f"per data point, shape ({batch},). Sum over coordinates and latent dimensions, not over the batch."
        )
    got = expect_shape("elbo_estimate(x, encoder, decoder, eps)", got, (batch,))
    expect_finite("elbo_estimate", got)
    got = got.detach().to(torch.float64)
    if not torch.allclose(got, variants["correct"], rtol=1e-6, atol=1e-8):
        mistake = _first_match(got, {k: v for k, v in variants.items() if k != "correct"})
        if mistake is not None:
            raise CheckFailed(f"elbo_estimate gives the wrong value: {mistake}.")
        expect_close("elbo_estimate", got, variants["correct"], rtol=1e-6, atol=1e-8,
                     hint="ELBO = log N(x; mean(z), diag exp(log_var_dec)) - KL(N(mu, diag exp(log_var)) || N(0, I)) "
                          "with z = mu + exp(0.5 * log_var) * eps; sum over coordinates.")


def check_elbo_estimate(fn: Callable[..., Any]) -> None:
    """Check ``fn(x, encoder, decoder, eps) -> (B,)``, the one-sample reparameterised ELBO."""
    _check_elbo_case(fn, x_dim=2, z_dim=2, batch=6, seed=0)
    passed("shape (B,) and value on a batch of 6 (x_dim = 2, z_dim = 2)")
    _check_elbo_case(fn, x_dim=3, z_dim=1, batch=4, seed=10)
    passed("value with x_dim = 3, z_dim = 1")

    x, encoder, decoder, eps = _elbo_problem(2, 2, 5, seed=20)
    expected = _reference_gradients(x, encoder, decoder, eps)
    value = call_learner(fn, x, encoder, decoder, eps, name="elbo_estimate")
    if not isinstance(value, Tensor) or not value.requires_grad:
        raise CheckFailed(
            "elbo_estimate returns a value that is not connected to the encoder's parameters (no gradient): "
            "compute it with torch operations, without torch.no_grad(), .detach(), .item() or numpy."
        )
    grads = torch.autograd.grad(value.sum(), list(encoder.parameters()), allow_unused=True)
    for got_g, exp_g in zip(grads, expected):
        got_g = torch.zeros_like(exp_g) if got_g is None else got_g
        if not torch.allclose(got_g, exp_g, rtol=1e-5, atol=1e-8):
            raise CheckFailed(
                "elbo_estimate has the right value but the wrong gradient with respect to the encoder: the "
                "reconstruction term must be differentiated through z = mu + exp(0.5 * log_var) * eps "
                "(the reparameterisation trick). Do not detach z or draw it with torch.normal(mu, std)."
            )
    passed("gradients reach the encoder through z (reparameterisation)")
    all_passed("elbo_estimate")


# ----------------------------------------------------------------------------------------
# exercise 2: the gradient penalty
# ----------------------------------------------------------------------------------------


class _LinearCritic(torch.nn.Module):
    """f(x) = w · x: ∇f = w everywhere, so GP = (|w| - 1)^2 exactly."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w


class _HalfSquareCritic(torch.nn.Module):
    """f(x) = |x - c|^2 / 2: ∇f(x) = x - c, so GP depends on where x̂ is."""

    def __init__(self, centre: list[float]) -> None:
        super().__init__()
        self.centre = torch.nn.Parameter(torch.tensor(centre, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * ((x - self.centre) ** 2).sum(-1)


def _gp_points(batch: int, dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    g = _generator(seed)
    real = torch.randn(batch, dim, generator=g, dtype=torch.float64) + 2.0
    fake = 1.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64) - 1.0
    t = torch.rand(batch, 1, generator=g, dtype=torch.float64)
    return real, fake, t


def _gp_variants(critic: torch.nn.Module, real: Tensor, fake: Tensor, t: Tensor) -> dict[str, float]:
    """The correct penalty (key "correct") and the values of common mistakes, with their diagnosis."""

    def gradients(points: Tensor) -> Tensor:
        p = points.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(critic(p).sum(), p)
        return g

    grad = gradients(t * real + (1 - t) * fake)
    norm = grad.norm(dim=-1)
    return {
        "correct": float(((norm - 1) ** 2).mean()),
        "it uses the squared gradient norm |∇f|², but the penalty is (|∇f| - 1)² with the norm |∇f| = sqrt(Σ_i (∂f/∂x_i)²)":
            float(((norm**2 - 1) ** 2).mean()),
        "it penalises |∇f|² (no '- 1'); the penalty pulls the norm towards 1: mean((|∇f| - 1)²)":
            float((norm**2).mean()),
        "real and fake are swapped in the interpolation: x̂ = t * real + (1 - t) * fake":
            float(((gradients(t * fake + (1 - t) * real).norm(dim=-1) - 1) ** 2).mean()),
        "the penalty is evaluated at the real samples only; evaluate it at x̂ = t * real + (1 - t) * fake":
            float(((gradients(real).norm(dim=-1) - 1) ** 2).mean()),
        "the penalty is evaluated at the fake samples only; evaluate it at x̂ = t * real + (1 - t) * fake":
            float(((gradients(fake).norm(dim=-1) - 1) ** 2).mean()),
        "it is one-sided (only norms above 1 are penalised); WGAN-GP uses the two-sided (|∇f| - 1)²":
            float((torch.relu(norm - 1) ** 2).mean()),
        "it sums over the batch instead of averaging": float(((norm - 1) ** 2).sum()),
        "the gradient norm is taken over the batch dimension instead of per sample (use dim=-1)":
            float(((grad.norm(dim=0) - 1) ** 2).mean()),
    }


def _check_gp_case(fn: Callable[..., Any], critic: torch.nn.Module, real: Tensor, fake: Tensor, t: Tensor,
                   label: str) -> Tensor:
    variants = _gp_variants(critic, real, fake, t)
    got = call_learner(fn, critic, real, fake, t, name="gradient_penalty")
    if not isinstance(got, Tensor):
        raise CheckFailed(
            f"gradient_penalty should return a torch.Tensor (a scalar that can be backpropagated), got {type(got).__name__}"
        )
    value = as_float("gradient_penalty", got)
    expected = variants.pop("correct")
    if not math.isfinite(value) or abs(value - expected) > 1e-8 + 1e-6 * abs(expected):
        for mistake, wrong in variants.items():
            if abs(value - wrong) <= 1e-8 + 1e-6 * abs(wrong):
                raise CheckFailed(f"gradient_penalty {label} is {value:.6g}, expected {expected:.6g}: {mistake}.")
        expect_close(f"gradient_penalty {label}", value, expected, rtol=1e-6, atol=1e-8,
                     hint="GP = mean over the batch of (|∇_x f(x̂)|_2 - 1)², x̂ = t * real + (1 - t) * fake.")
    return got


def check_gradient_penalty(fn: Callable[..., Any]) -> None:
    """Check ``fn(critic, real, fake, t) -> scalar``, the WGAN-GP gradient penalty."""
    real, fake, t = _gp_points(8, 2, seed=0)
    _check_gp_case(fn, _LinearCritic([1.2, -1.6]), real, fake, t, "for f(x) = w·x with |w| = 2")
    passed("f(x) = w·x with |w| = 2 gives (2 - 1)² = 1")
    _check_gp_case(fn, _HalfSquareCritic([0.5, -0.3]), real, fake, t, "for f(x) = |x - c|²/2")
    passed("f(x) = |x - c|²/2: evaluated at the interpolates")
    critic = Critic(3, hidden=(16, 16), seed=3).double()
    real3, fake3, t3 = _gp_points(10, 3, seed=1)
    got = _check_gp_case(fn, critic, real3, fake3, t3, "for a small MLP critic")
    passed("value for an MLP critic in 3-D")

    params = list(critic.parameters())
    # the last bias does not change ∇_x f, so its gradient is unused (None): compare as zeros
    expected = [torch.zeros_like(p) if g is None else g for p, g in zip(
        params, torch.autograd.grad(gradient_penalty(critic, real3, fake3, t3), params, allow_unused=True))]
    if not got.requires_grad:
        raise CheckFailed(
            "gradient_penalty's value cannot be differentiated with respect to the critic's parameters, so the "
            "critic would never be penalised: pass create_graph=True to torch.autograd.grad."
        )
    try:
        grads = torch.autograd.grad(got, params, allow_unused=True)
    except RuntimeError as err:
        raise CheckFailed(
            f"gradient_penalty's value cannot be differentiated with respect to the critic's parameters ({err}); "
            "pass create_graph=True to torch.autograd.grad and do not detach the result."
        ) from err
    for got_g, exp_g in zip(grads, expected):
        got_g = torch.zeros_like(exp_g) if got_g is None else got_g
        if not torch.allclose(got_g, exp_g, rtol=1e-5, atol=1e-9):
            raise CheckFailed(
                "gradient_penalty has the right value but the wrong gradient with respect to the critic's "
                "parameters: compute ∇_x f with torch.autograd.grad(..., create_graph=True) on x̂ that requires "
                "grad, and do not detach the result."
            )
    passed("differentiable with respect to the critic's parameters (create_graph=True)")
    all_passed("gradient_penalty")


# The package functions each exercise asks the learner to write: inside the exercise's check
# they refuse to run (boltzlab.grading.write_yourself), in the notebook and the grader alike.
WRITE_YOURSELF = {"gradient_penalty": ("boltzlab.training.generative.gradient_penalty",)}
write_yourself.register(WRITE_YOURSELF)
