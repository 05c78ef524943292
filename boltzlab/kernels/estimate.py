r"""The result type of the Monte Carlo score estimator and the checks on its inputs.

For noisy points x_t (B, dim) at noise level sigma_t, K perturbed copies
x_k = x_t + sigma_t eps_k (eps_k centre-of-mass free for particle systems) and
log-weights l_k = -E(x_k) / kT, the DEM score target is

    S_K(x_t) = sum_k softmax_k(l) F(x_k) / kT,     F = -grad E,

the gradient of log[(1/K) sum_k exp(l_k)], an estimate of grad log p_t(x_t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzlab.energies import Energy
from boltzlab.kernels.online_lse import OnlineLSEState


class ScoreInputError(ValueError):
    """Raised for inputs the score estimator cannot use (shapes, dtypes, sigma, noise)."""


@dataclass(frozen=True)
class ScoreEstimate:
    """Output of :func:`boltzlab.kernels.mc_score_estimate`.

    ``score`` (B, dim): S_K(x_t). ``log_normalizer`` (B,): log[(1/K) sum_k exp(-E(x_k)/kT)].
    ``ess`` (B,): Kish effective sample size of the weights, (sum w)^2 / sum w^2, in [1, K].
    ``n_energy_evals``: energy-and-force evaluations used, B * K (what training code counts).
    ``noise_score`` (B, dim) or None: the noise (Tweedie) form of the same self-normalised
    estimate, sum_k w_k eps_k / sigma with the same weights and the same (centre-of-mass-free)
    eps_k; computed when asked for (``noise_form=True``), NaN where sigma = 0 (0/0 there).
    """

    score: Tensor
    log_normalizer: Tensor
    ess: Tensor
    n_energy_evals: int
    noise_score: Tensor | None = None


@dataclass(frozen=True)
class ScoreInputs:
    """Checked inputs: ``x_t`` (B, dim), ``sigma`` (B,) in x_t's dtype and device,
    ``noise`` (B, K, dim) or None, ``n_samples`` K."""

    x_t: Tensor
    sigma: Tensor
    noise: Tensor | None
    n_samples: int

    @property
    def batch(self) -> int:
        return int(self.x_t.shape[0])


def check_score_inputs(
    energy: Energy,
    x_t: Tensor,
    sigma: float | Tensor,
    n_samples: int | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> ScoreInputs:
    """Validate the estimator's arguments and normalise sigma to shape (B,).

    Raises :class:`ScoreInputError` naming the problem.
    """
    if not isinstance(energy, Energy):
        raise ScoreInputError(f"energy must be a boltzlab.energies.Energy, got {type(energy).__name__}")
    x_t = energy.check_input(x_t)
    if x_t.ndim != 2:
        raise ScoreInputError(f"x_t must have shape (B, {energy.dim}), got {tuple(x_t.shape)}")
    batch = int(x_t.shape[0])
    sigma_t = _check_sigma(sigma, batch, x_t)
    if noise is not None:
        if generator is not None:
            raise ScoreInputError("give either noise or a generator, not both")
        if not isinstance(noise, Tensor) or not noise.is_floating_point():
            raise ScoreInputError("noise must be a floating torch.Tensor of shape (B, K, dim)")
        if noise.ndim != 3 or noise.shape[0] != batch or noise.shape[2] != energy.dim or noise.shape[1] < 1:
            raise ScoreInputError(
                f"noise must have shape ({batch}, K, {energy.dim}) with K >= 1, got {tuple(noise.shape)}"
            )
        if n_samples is not None and n_samples != noise.shape[1]:
            raise ScoreInputError(f"n_samples={n_samples} does not match noise with K={noise.shape[1]}")
        if not bool(torch.isfinite(noise).all()):
            raise ScoreInputError("noise contains NaN or infinite entries")
        noise = noise.to(dtype=x_t.dtype, device=x_t.device)
        n_samples = int(noise.shape[1])
    else:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ScoreInputError(f"n_samples must be a positive int when no noise is given, got {n_samples!r}")
    return ScoreInputs(x_t=x_t, sigma=sigma_t, noise=noise, n_samples=int(n_samples))


def _check_sigma(sigma: float | Tensor, batch: int, like: Tensor) -> Tensor:
    if isinstance(sigma, Tensor):
        if sigma.ndim == 0:
            sigma = sigma.expand(batch)
        elif sigma.shape == (batch, 1):
            sigma = sigma[:, 0]
        if sigma.shape != (batch,):
            raise ScoreInputError(f"sigma must be a scalar or have shape ({batch},), got {tuple(sigma.shape)}")
        sigma_t = sigma.to(dtype=like.dtype, device=like.device)
    elif isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        sigma_t = torch.full((batch,), float(sigma), dtype=like.dtype, device=like.device)
    else:
        raise ScoreInputError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if not bool(torch.isfinite(sigma_t).all()) or bool((sigma_t < 0).any()):
        raise ScoreInputError("sigma must be finite and >= 0")
    return sigma_t.contiguous()


def noise_form_score(weighted_noise: Tensor, sigma: Tensor) -> Tensor:
    """sum_k w_k eps_k / sigma from the normalised weighted noise (B, dim) and sigma (B,);
    NaN in rows with sigma = 0, where the noise form is 0/0."""
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    out = weighted_noise / safe[:, None]
    return torch.where((sigma > 0)[:, None], out, torch.full_like(out, math.nan))


def finish_estimate(state: OnlineLSEState, kT: float, n_samples: int, sigma: Tensor | None = None) -> ScoreEstimate:
    """Turn the final online-logsumexp state into a :class:`ScoreEstimate`.

    The state's values are the forces (B, dim), or with ``sigma`` (B,) given, the forces and
    the centred noise side by side (B, 2 dim), from which the noise form is formed too."""
    s1 = state.sum_weights
    weighted = state.weighted_sum / s1[:, None]
    noise_score = None
    if sigma is not None:
        weighted, weighted_noise = weighted.chunk(2, dim=1)
        noise_score = noise_form_score(weighted_noise, sigma)
    return ScoreEstimate(
        score=weighted / kT,
        log_normalizer=state.max_log_weight + torch.log(s1) - math.log(n_samples),
        ess=s1 * s1 / state.sum_sq_weights,
        n_energy_evals=int(s1.shape[0]) * n_samples,
        noise_score=noise_score,
    )
