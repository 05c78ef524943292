r"""Plain PyTorch references for the kernels, written for clarity rather than speed.

- :func:`dense_pair_energy_forces`: energies and analytic forces of a pair potential from the
  dense (B, N, N) matrix of pair vectors, the same algorithm the kernels tile
  (equations in :mod:`boltzlab.kernels.pair_params`).
- :func:`reference_score_estimate`: the Monte Carlo score target with all B * K copies
  materialised and a plain softmax over K.
- :func:`autograd_score_estimate` and :func:`vmap_grad_score_estimate`: the straightforward
  implementations, gradients of log[(1/K) sum_k exp(-E(x_t + sigma eps_k)/kT)] by autograd
  (the second per point with torch.func, as the public iDEM code does). They are the
  baselines of the benchmark and an independent check of the analytic forces.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from boltzlab.energies import Energy, PairPotential
from boltzlab.kernels.estimate import ScoreEstimate, check_score_inputs, noise_form_score
from boltzlab.kernels.noise import project_noise
from boltzlab.kernels.pair_params import PairParams


def _pair_terms(params: PairParams, r: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
    """Dense pair sums for positions ``r`` (..., N, d): E (...) and F (..., N, d) or None."""
    n = params.n_particles
    rij = r[..., :, None, :] - r[..., None, :, :]  # (..., N, N, d): x_i - x_j
    r2 = (rij * rij).sum(-1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=r.device)
    r2_safe = torch.where(off_diagonal, r2, torch.ones_like(r2))  # no 0/0 on the diagonal
    d_min_sq = params.d_min**2
    clamped = r2_safe < d_min_sq
    if params.kind == "lj":
        inv_d2 = 1.0 / r2_safe.clamp_min(d_min_sq)
        s6 = (params.r_m**2 * inv_d2) ** 3
        u = params.eps * (s6 * s6 - 2.0 * s6)
        g_free = 12.0 * params.pair_factor * params.eps * (s6 * s6 - s6) * inv_d2
    else:
        d = r2_safe.clamp_min(d_min_sq).sqrt()
        t = d - params.dw_d0
        u = params.dw_a * t**4 + params.dw_b * t**2
        g_free = -params.pair_factor * (4.0 * params.dw_a * t**3 + 2.0 * params.dw_b * t) / d
    u = torch.where(off_diagonal, u, torch.zeros_like(u))
    energy = 0.5 * params.pair_factor * u.sum((-1, -2))  # each unique pair appears twice
    centred = r - r.mean(-2, keepdim=True)
    if params.harmonic:
        energy = energy + 0.5 * params.harmonic * (centred * centred).sum((-1, -2))
    if not want_forces:
        return energy, None
    tiny = params.tiny_r2(r.dtype)
    g_clamped = params.clamp_coef * torch.rsqrt(r2_safe.clamp_min(tiny))
    g = torch.where(clamped, g_clamped, g_free)
    g = torch.where(off_diagonal, g, torch.zeros_like(g))
    forces = (g[..., None] * rij).sum(-2)
    if params.harmonic:
        forces = forces - params.harmonic * centred
    return energy, forces


def dense_pair_energy(potential: PairPotential, x: Tensor) -> Tensor:
    """E(x) of a pair potential, ``(..., dim) -> (...)``, differentiable and free of
    data-dependent Python branches (usable under ``torch.func.vmap``)."""
    params = PairParams.from_potential(potential)
    r = x.reshape(*x.shape[:-1], params.n_particles, params.spatial_dim)
    return _pair_terms(params, r, want_forces=False)[0]


def dense_pair_energy_forces(potential: PairPotential, x: Tensor) -> tuple[Tensor, Tensor]:
    """(E(x), F(x) = -grad E(x)) of a pair potential: ``(..., dim) -> ((...), (..., dim))``.

    Dense over all ordered pairs (memory O(N^2) per configuration); energies.py's conventions.
    """
    params = PairParams.from_potential(potential)
    x = potential.check_input(x)
    r = x.reshape(*x.shape[:-1], params.n_particles, params.spatial_dim)
    energy, forces = _pair_terms(params, r, want_forces=True)
    assert forces is not None
    return energy, forces.reshape(x.shape)


def _energy_and_forces(energy: Energy, x: Tensor) -> tuple[Tensor, Tensor]:
    if isinstance(energy, PairPotential):
        return dense_pair_energy_forces(energy, x)
    return energy.energy_and_forces(x)


def perturbed_copies(energy: Energy, x_t: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """x_k = x_t + sigma eps_k with eps projected for particle systems: (B, dim), (B,), (B, K, dim) -> (B, K, dim)."""
    return x_t[:, None, :] + sigma[:, None, None] * project_noise(noise, energy)


def reference_log_weights(energy: Energy, x_t: Tensor, sigma: float | Tensor, noise: Tensor) -> Tensor:
    """l_k = -E(x_k)/kT for all copies, ``(B, K)`` (materialised)."""
    inputs = check_score_inputs(energy, x_t, sigma, None, noise, None)
    assert inputs.noise is not None
    copies = perturbed_copies(energy, inputs.x_t, inputs.sigma, inputs.noise)
    return -_energy_and_forces(energy, copies)[0] / energy.kT


def reference_score_estimate(energy: Energy, x_t: Tensor, sigma: float | Tensor, noise: Tensor) -> ScoreEstimate:
    """S_K(x_t) = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT with all B * K copies in memory, and
    its noise form sum_k softmax_k(-E(x_k)/kT) eps_k / sigma (``noise_score``, always computed).

    Shapes: x_t (B, dim), sigma scalar or (B,), noise (B, K, dim) -> :class:`ScoreEstimate`.
    Forces are analytic (dense pair reference for pair potentials, ``energy_and_forces`` otherwise).
    """
    inputs = check_score_inputs(energy, x_t, sigma, None, noise, None)
    assert inputs.noise is not None
    eps = project_noise(inputs.noise, energy)
    copies = inputs.x_t[:, None, :] + inputs.sigma[:, None, None] * eps
    e, f = _energy_and_forces(energy, copies)
    log_w = -e / energy.kT
    w = torch.softmax(log_w, dim=1)
    return ScoreEstimate(
        score=(w[..., None] * f).sum(1) / energy.kT,
        log_normalizer=torch.logsumexp(log_w, dim=1) - math.log(inputs.n_samples),
        ess=1.0 / (w * w).sum(1),
        n_energy_evals=inputs.batch * inputs.n_samples,
        noise_score=noise_form_score((w[..., None] * eps).sum(1), inputs.sigma),
    )


def autograd_score_estimate(energy: Energy, x_t: Tensor, sigma: float | Tensor, noise: Tensor) -> ScoreEstimate:
    """The straightforward estimator: materialise the B * K copies, evaluate E with
    ``energy.energy`` and differentiate log[(1/K) sum_k exp(-E(x_k)/kT)] with respect to x_t.

    Same shapes and output as :func:`reference_score_estimate`; memory grows with B * K * N^2.
    """
    inputs = check_score_inputs(energy, x_t, sigma, None, noise, None)
    assert inputs.noise is not None
    x = inputs.x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        copies = perturbed_copies(energy, x, inputs.sigma, inputs.noise)
        log_w = -energy.energy(copies) / energy.kT
        log_norm = torch.logsumexp(log_w, dim=1) - math.log(inputs.n_samples)
        (score,) = torch.autograd.grad(log_norm.sum(), x)
    w = torch.softmax(log_w.detach(), dim=1)
    return ScoreEstimate(score=score, log_normalizer=log_norm.detach(), ess=1.0 / (w * w).sum(1),
                         n_energy_evals=inputs.batch * inputs.n_samples)


def vmap_grad_score_estimate(potential: PairPotential, x_t: Tensor, sigma: float | Tensor, noise: Tensor) -> Tensor:
    """The estimator as the public iDEM code writes it: ``vmap(grad(log_expectation))`` over points,
    with the dense pair energy. Returns only the score (B, dim)."""
    inputs = check_score_inputs(potential, x_t, sigma, None, noise, None)
    assert inputs.noise is not None
    eps = project_noise(inputs.noise, potential)
    kT, log_k = potential.kT, math.log(inputs.n_samples)

    def log_expectation(x: Tensor, s: Tensor, e: Tensor) -> Tensor:
        return torch.logsumexp(-dense_pair_energy(potential, x[None, :] + s * e) / kT, dim=0) - log_k

    return torch.func.vmap(torch.func.grad(log_expectation))(inputs.x_t, inputs.sigma, eps)
