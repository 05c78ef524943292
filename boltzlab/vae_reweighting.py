r"""Exact importance reweighting of a VAE on the joint (x, z) (chapter 01).

A VAE's marginal q_θ(x) = ∫ p(z) p_θ(x | z) dz has no closed form, but its joint
p(z) p_θ(x | z) does. Take as the target on (x, z) the *extended* distribution

    π(x, z) = p(x) r(z | x),     p(x) ∝ exp(-E(x)/kT),

with r any normalised conditional density of z (the VAE's encoder q_φ(z | x) is the natural
choice). Its x-marginal is p, because ∫ r(z | x) dz = 1. Sampling z ~ p(z), x ~ p_θ(x | z)
and weighting by

    w = exp(-E(x)/kT) q_φ(z | x) / ( p(z) p_θ(x | z) )

is ordinary importance sampling of π, so the self-normalised E_w[f(x)] is consistent for
E_p[f]. The encoder only has to be normalised, not exact: a poor encoder costs effective
sample size, not correctness. When the VAE is perfect (p_θ(x) = p and q_φ = the exact
posterior) every weight is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzlab.metrics import kish_ess, self_normalized_weights
from boltzlab.models import VAE

__all__ = ["JointWeights", "VaeReweightingError", "vae_joint_log_weights", "weighted_mean"]

LOG_2PI = math.log(2 * math.pi)


class VaeReweightingError(ValueError):
    """Raised for arguments the joint reweighting cannot use."""


@dataclass(frozen=True)
class JointWeights:
    """Samples (x, z) from a VAE and their log-weights toward p(x) q_φ(z | x).

    ``x`` ``(n, x_dim)`` in data units, ``z`` ``(n, z_dim)``, ``log_w`` ``(n,)`` float64,
    and the Kish effective sample size ``ess`` of the weights."""

    x: Tensor
    z: Tensor
    log_w: Tensor
    ess: float


def _gaussian_log_prob(z: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    return -0.5 * (((z - mean) ** 2) * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


@torch.no_grad()
def vae_joint_log_weights(vae: VAE, log_target: Callable[[Tensor], Tensor], n: int,
                          generator: torch.Generator | None = None) -> JointWeights:
    r"""Draw n pairs z ~ N(0, I), x ~ p_θ(x | z) from ``vae`` and return them with

        log w = log p̃(x) + log q_φ(z | x) - log p(z) - log p_θ(x | z),

    where ``log_target(x)`` ``(n, x_dim) -> (n,)`` is the unnormalised log p̃(x) = -E(x)/kT
    (e.g. ``energy.log_prob``), and p_θ(x | z) and q_φ(z | x) are densities in data units:
    the VAE works on u = (x - loc)/scale, so log p_θ(x | z) = log p_θ(u | z) - Σ log scale.
    The decoder must be stochastic (a density in x); the weights are defined up to a
    constant (log Z), which self-normalisation removes.
    """
    if not isinstance(vae, VAE):
        raise VaeReweightingError(f"vae must be a boltzlab.models.VAE, got {type(vae).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise VaeReweightingError(f"n must be an int >= 2, got {n!r}")
    ref = vae.standardizer.loc
    z = torch.randn((n, vae.z_dim), generator=generator, dtype=ref.dtype).to(ref.device)
    u = vae.decoder.sample(z, generator=generator, noise=True)
    x = vae.standardizer.inverse(u)
    log_decoder = vae.decoder.log_prob(u, z) + vae.standardizer.log_det.to(u.dtype)
    mu, log_var = vae.encoder(u)
    log_encoder = _gaussian_log_prob(z, mu, log_var)
    log_prior = -0.5 * (z**2 + LOG_2PI).sum(-1)
    log_p = log_target(x)
    if not isinstance(log_p, Tensor) or log_p.shape != (n,):
        got = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
        raise VaeReweightingError(f"log_target must map (n, x_dim) to (n,), returned {got}")
    log_w = log_p.double() + log_encoder.double() - log_prior.double() - log_decoder.double()
    if bool(torch.isnan(log_w).any()):
        raise VaeReweightingError("log-weights contain NaN (check log_target and the decoder)")
    return JointWeights(x=x, z=z, log_w=log_w, ess=kish_ess(log_w))


def weighted_mean(values: Tensor, log_w: Tensor) -> tuple[float, float]:
    r"""Self-normalised estimate Σ w̄_i f_i of E_p[f] from ``values`` f ``(n,)`` and ``log_w``
    ``(n,)``, with its delta-method standard error sqrt(Σ w̄_i² (f_i - f̂)²) (asymptotic; it
    understates the error when the weights are heavy-tailed and the ESS small)."""
    if not isinstance(values, Tensor) or values.ndim != 1 or not isinstance(log_w, Tensor) or log_w.shape != values.shape:
        raise VaeReweightingError("values and log_w must be 1-D tensors of the same length")
    wbar = self_normalized_weights(log_w.double())
    f = values.double()
    mean = float((wbar * f).sum())
    return mean, float(torch.sqrt((wbar**2 * (f - mean) ** 2).sum()))
