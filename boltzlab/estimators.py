r"""Monte Carlo estimators of the score of a noised Boltzmann density (the DEM target).

Denoising energy matching regresses a network onto the score of the VE-noised density

    p_t = p * N(0, sigma_t^2 I),       p(x) ∝ exp(-E(x)/kT),

    grad log p_t(x) = E_eps[exp(-E(x + sigma eps)/kT) F(x + sigma eps)/kT] / E_eps[exp(-E(x + sigma eps)/kT)],

with forces F = -grad E (Tweedie / "score of a convolution" identity: differentiate
p_t(x) = E_eps[p(x + sigma eps)] under the expectation). With K draws eps_k ~ N(0, I)
(centre-of-mass free for particle systems) and l_k = -E(x + sigma eps_k)/kT:

=============  ===========================================================================
``"lse"``      S_K = sum_k softmax_k(l) F_k/kT. The DEM estimator: a self-normalised ratio,
               consistent (-> grad log p_t as K -> inf) with an O(1/K) bias; the softmax is
               computed with the logsumexp shift, so it is finite for any energies.
``"naive"``    the same ratio written as (sum_k e^{l_k} F_k/kT) / (sum_k e^{l_k}): numerator
               and denominator are each unbiased (for grad p_t and p_t up to Z), but e^{l_k}
               overflows (l_k > 88 in float32) or underflows (l_k < -103) to inf/0 -> NaN.
``"jensen"``   the "mean of scores" (1/K) sum_k F_k/kT: uniform weights. Unbiased for
               E_eps[grad log p(x + sigma eps)] = grad (log p * N_sigma)(x), the gradient of
               the *smoothed log-density*, which by Jensen lies below log p_t; that is NOT
               grad log p_t (for p = N(mu, s^2 I): -(x - mu)/s^2 instead of -(x - mu)/(s^2 + sigma^2)).
               Low variance, biased at every K.
=============  ===========================================================================

Options: Richardson extrapolation in K (:func:`richardson_score`) removes the O(1/K) term of
the self-normalised bias; :func:`clip_score` bounds the norm per particle or per vector, as
iDEM does to its regression targets. :func:`gmm_noised_score` is the exact answer for a
Gaussian mixture, against which every estimator here is measured.

All functions take ``x_t`` of shape (B, dim), ``sigma`` a float or a tensor of shape (B,),
and explicit noise ``eps`` of shape (B, K, dim) or a ``torch.Generator`` (see :func:`draw_eps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from boltzlab.energies import Energy, GaussianMixture, PairPotential
from boltzlab.kernels import draw_noise, lj_energy_forces, mc_score_estimate
from boltzlab.kernels.estimate import ScoreInputError, ScoreInputs, check_score_inputs
from boltzlab.kernels.noise import project_noise

EstimatorName = Literal["lse", "naive", "jensen", "blended"]
ESTIMATORS: tuple[str, ...] = ("lse", "naive", "jensen", "blended")

_MAX_COPY_ELEMENTS = 1 << 14
"""Largest number of (point, copy, coordinate) entries evaluated at once; larger batches are
split over points. Small on purpose: an energy's temporaries (GMM-40's difference tensor holds
40x the copies' entries) then stay small and warm in cache; against 1 << 22 this made the GMM-40
estimate about 3x faster, with identical results (benchmarks/bench_gmm_score.py). A point's K
copies are never split."""


_MAX_SHIFTED_ELEMENTS = 1 << 20
"""Copy entries per chunk of :func:`shifted_lse_score` (its pair kernel is fastest on large batches)."""


def draw_eps(
    energy: Energy,
    batch: int,
    n_samples: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard normal perturbations eps, shape (batch, n_samples, dim), projected onto the
    centre-of-mass-free subspace for particle systems.

    Drawn exactly as :func:`boltzlab.kernels.mc_score_estimate` draws them from the same
    generator state, so both see the same copies."""
    if n_samples < 1 or batch < 1:
        raise ValueError(f"need batch >= 1 and n_samples >= 1, got batch={batch}, n_samples={n_samples}")
    eps = draw_noise(energy, batch, n_samples, generator=generator, dtype=dtype, device=device)
    return project_noise(eps, energy)


def copy_log_weights_and_forces(energy: Energy, x_t: Tensor, sigma: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """For x_k = x_t + sigma eps_k: log-weights l_k = -E(x_k)/kT, shape (B, K), and forces
    F(x_k), shape (B, K, dim). ``sigma`` has shape (B,); ``eps`` (B, K, dim) is projected
    here for particle systems. Materialises B * K copies, in chunks of points."""
    eps = project_noise(eps, energy)
    per_point = eps.shape[1] * eps.shape[2]
    step = max(1, _MAX_COPY_ELEMENTS // per_point)
    log_w, forces = [], []
    for b0 in range(0, x_t.shape[0], step):
        copies = x_t[b0:b0 + step, None, :] + sigma[b0:b0 + step, None, None] * eps[b0:b0 + step]
        e, f = energy.energy_and_forces(copies)
        log_w.append(-e / energy.kT)
        forces.append(f)
    return torch.cat(log_w), torch.cat(forces)


def _combine(log_w: Tensor, forces: Tensor, kT: float, estimator: str) -> Tensor:
    """sum_k w_k F_k / kT with the estimator's weights: (B, K), (B, K, dim) -> (B, dim)."""
    if estimator == "lse":
        w = torch.softmax(log_w, dim=1)
    elif estimator == "jensen":
        w = torch.full_like(log_w, 1.0 / log_w.shape[1])
    elif estimator == "naive":
        # deliberately without the max shift: this is the estimator that breaks in float32
        raw = torch.exp(log_w)
        w = raw / raw.sum(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    return (w[..., None] * forces).sum(dim=1) / kT


def _checked(energy: Energy, x_t: Tensor, sigma: float | Tensor, eps: Tensor) -> ScoreInputs:
    inputs = check_score_inputs(energy, x_t, sigma, None, eps, None)
    assert inputs.noise is not None
    return inputs


def lse_score(energy: Energy, x_t: Tensor, sigma: float | Tensor, eps: Tensor) -> Tensor:
    """DEM score target S_K(x_t) = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT, x_k = x_t + sigma eps_k.

    Shapes: x_t (B, dim), sigma float or (B,), eps (B, K, dim) -> (B, dim). Computed in one
    streamed pass by :func:`boltzlab.kernels.mc_score_estimate` (noise projected to the
    centre-of-mass-free subspace there for particle systems), never holding the K copies."""
    inputs = _checked(energy, x_t, sigma, eps)
    return mc_score_estimate(energy, inputs.x_t, inputs.sigma, noise=inputs.noise).score


def shifted_lse_score(energy: Energy, x_t: Tensor, sigma: float | Tensor, shift: Tensor, eps: Tensor) -> Tensor:
    """The self-normalised force-form estimate with the copies drawn around a shifted centre,
    y_k = x_t + delta + sigma eps_k, reweighted to the posterior
    pi(y) ∝ exp(-E(y)/kT) N(x_t; y, sigma^2 I) against the proposal N(x_t + delta, sigma^2 I):

        log w_k = -E(y_k)/kT - delta . eps_k / sigma,    S = sum_k softmax_k(log w) F(y_k)/kT.

    Any ``shift`` delta (B, dim) leaves the K -> inf limit at grad log p_t(x_t); a good one
    (sigma^2 times a learned score: Tweedie's first guess of the posterior mean) puts the copies
    where the posterior is. delta = 0 is :func:`lse_score`. Shapes: x_t (B, dim), sigma float or
    (B,), shift (B, dim), eps (B, K, dim) -> (B, dim). The copies are materialised in chunks of
    points (pair potentials through the fast pair kernel)."""
    inputs = _checked(energy, x_t, sigma, eps)
    if shift.shape != inputs.x_t.shape:
        raise ValueError(f"shift must have the shape of x_t {tuple(inputs.x_t.shape)}, got {tuple(shift.shape)}")
    if not torch.isfinite(shift).all():
        raise ValueError("shift has NaN or infinite entries")
    noise = project_noise(inputs.noise, energy)
    sig, centre = inputs.sigma, inputs.x_t + shift
    step = max(1, _MAX_SHIFTED_ELEMENTS // (noise.shape[1] * noise.shape[2]))
    out = []
    for b0 in range(0, centre.shape[0], step):
        sl = slice(b0, b0 + step)
        copies = centre[sl, None, :] + sig[sl, None, None] * noise[sl]
        e, f = lj_energy_forces(energy, copies) if isinstance(energy, PairPotential) else energy.energy_and_forces(copies)
        log_w = -e / energy.kT - (noise[sl] * shift[sl, None, :]).sum(-1) / sig[sl, None]
        out.append(_combine(log_w, f, energy.kT, "lse"))
    return torch.cat(out)


def blend_weight(sigma: Tensor, local_scale: float) -> Tensor:
    """a(sigma) = 1 / (1 + (sigma / l)^4), the force form's share in :func:`blended_score`: (B,) -> (B,)."""
    return 1.0 / (1.0 + (sigma / local_scale) ** 4)


def blend_forms(force_form: Tensor, noise_form: Tensor, sigma: Tensor, local_scale: float) -> Tensor:
    """a S_F + (1 - a) S_U with a = :func:`blend_weight`: (B, dim), (B, dim), (B,) -> (B, dim).
    Where sigma = 0 the noise form is undefined and a = 1: the force form alone."""
    a = blend_weight(sigma, local_scale)[:, None]
    mixed = a * force_form + (1.0 - a) * noise_form
    return torch.where((sigma > 0)[:, None], mixed, force_form)


def blended_score(energy: Energy, x_t: Tensor, sigma: float | Tensor, eps: Tensor | None, local_scale: float,
                  *, n_samples: int | None = None, generator: torch.Generator | None = None,
                  compile: bool | None = None) -> Tensor:
    r"""Force form and noise form of the same self-normalised estimate, blended by noise level.

    With x_k = x_t + sigma eps_k and w = softmax_k(-E(x_k)/kT), two estimators share the
    weights and have the same limit ∇ log p_t(x_t) as K grows (integration by parts):

        force form  S_F = sum_k w_k F(x_k) / kT      (chapter 05's LSE estimator)
        noise form  S_U = sum_k w_k eps_k / sigma    (Tweedie: E[x_0 - x_t | x_t] / sigma^2)

    S_F is exact as sigma -> 0 but its variance grows with sigma (the copies spread over
    wildly different forces); S_U is bounded by max |eps| / sigma, so it is the quiet one at
    large sigma and the noisy one at small sigma. The blend
    S = a S_F + (1 - a) S_U with a = 1 / (1 + (sigma / l)^4) switches at sigma ≈ l, the
    width of the target's wells (``local_scale``). The fourth power matters: with
    a = l^2 / (l^2 + sigma^2) the force form's huge variance still leaks in at large sigma
    (on DW-4 at sigma = 3 its error is several times the noise form's alone).

    Both forms come from one streamed pass of :func:`boltzlab.kernels.mc_score_estimate`
    (``noise_form=True``): the K copies are never held at once. Shapes as :func:`lse_score`;
    instead of ``eps``, give ``n_samples`` and a ``generator`` (eps = None) to draw the noise
    chunk by chunk, the same numbers :func:`draw_eps` would draw. ``compile``: as in
    :func:`boltzlab.kernels.mc_score_estimate`.
    """
    if eps is not None:
        inputs = _checked(energy, x_t, sigma, eps)
        est = mc_score_estimate(energy, inputs.x_t, inputs.sigma, noise=inputs.noise, noise_form=True,
                                compile=compile)
    else:
        inputs = check_score_inputs(energy, x_t, sigma, n_samples, None, generator)
        est = mc_score_estimate(energy, inputs.x_t, inputs.sigma, inputs.n_samples, generator=generator,
                                noise_form=True, compile=compile)
    assert est.noise_score is not None
    return blend_forms(est.score, est.noise_score, inputs.sigma, local_scale)


def jensen_score(energy: Energy, x_t: Tensor, sigma: float | Tensor, eps: Tensor) -> Tensor:
    """"Mean of scores" (1/K) sum_k F(x_k)/kT: shapes as :func:`lse_score`.

    Unbiased for grad (log p * N_sigma)(x_t), the gradient of the Gaussian-smoothed
    log-density, which differs from grad log p_t at every K (see the module docstring)."""
    inputs = _checked(energy, x_t, sigma, eps)
    assert inputs.noise is not None
    log_w, forces = copy_log_weights_and_forces(energy, inputs.x_t, inputs.sigma, inputs.noise)
    return _combine(log_w, forces, energy.kT, "jensen")


def naive_score(energy: Energy, x_t: Tensor, sigma: float | Tensor, eps: Tensor) -> Tensor:
    """(sum_k e^{l_k} F(x_k)/kT) / (sum_k e^{l_k}) with e^{l_k} computed as is, l_k = -E(x_k)/kT.

    Mathematically the same as :func:`lse_score`; numerically it returns NaN (inf/inf or 0/0)
    when l_k exceeds about 88 or all l_k fall below about -103 in float32 (709 / -745 in
    float64). Kept to show why the logsumexp shift is needed. Shapes as :func:`lse_score`."""
    inputs = _checked(energy, x_t, sigma, eps)
    assert inputs.noise is not None
    log_w, forces = copy_log_weights_and_forces(energy, inputs.x_t, inputs.sigma, inputs.noise)
    return _combine(log_w, forces, energy.kT, "naive")


def richardson_score(
    energy: Energy, x_t: Tensor, sigma: float | Tensor, eps: Tensor, estimator: EstimatorName = "lse"
) -> Tensor:
    """Richardson extrapolation in K of a self-normalised estimator, from 2K copies.

    The ratio estimator has E[S_K] = s + b/K + O(1/K^2) (a ratio of two unbiased means is
    biased at order 1/K by the covariance of numerator and denominator). With eps split into
    halves A and B of K copies each,

        R = 2 S_2K - (S_K^A + S_K^B) / 2,     E[R] = s + O(1/K^2),

    at the cost of the same 2K energy evaluations as S_2K (and a larger variance: the
    extrapolation amplifies noise, so it pays when bias dominates, i.e. at large sigma_t).
    Shapes: eps (B, 2K, dim) with an even number of copies -> (B, dim)."""
    inputs = _checked(energy, x_t, sigma, eps)
    assert inputs.noise is not None
    n = inputs.n_samples
    if n % 2:
        raise ScoreInputError(f"Richardson extrapolation needs an even number of copies (2K), got {n}")
    log_w, forces = copy_log_weights_and_forces(energy, inputs.x_t, inputs.sigma, inputs.noise)
    half = n // 2
    full = _combine(log_w, forces, energy.kT, estimator)
    first = _combine(log_w[:, :half], forces[:, :half], energy.kT, estimator)
    second = _combine(log_w[:, half:], forces[:, half:], energy.kT, estimator)
    return 2.0 * full - 0.5 * (first + second)


def clip_score(score: Tensor, max_norm: float | Tensor, *, n_particles: int | None = None,
               spatial_dim: int | None = None) -> Tensor:
    """Scale down vectors whose Euclidean norm exceeds ``max_norm``, keeping their direction.

    Per particle when ``n_particles`` and ``spatial_dim`` are given (each particle's
    spatial_dim-vector is clipped on its own, as iDEM does), otherwise per whole vector.
    v <- v * min(1, max_norm / |v|). Shape (..., dim) -> (..., dim); ``max_norm`` a number or
    a tensor of shape (...) (one threshold per point, e.g. growing as the noise level falls)."""
    if isinstance(max_norm, Tensor):
        if max_norm.shape != score.shape[:-1]:
            raise ValueError(f"a per-point max_norm must have shape {tuple(score.shape[:-1])}, "
                             f"got {tuple(max_norm.shape)}")
        if not bool(((max_norm > 0) & torch.isfinite(max_norm)).all()):
            raise ValueError("max_norm must be positive and finite at every point")
    elif not (max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    if (n_particles is None) != (spatial_dim is None):
        raise ValueError("give both n_particles and spatial_dim for per-particle clipping, or neither")
    if n_particles is not None and spatial_dim is not None:
        if score.shape[-1] != n_particles * spatial_dim:
            raise ValueError(
                f"score has last dimension {score.shape[-1]}, expected n_particles * spatial_dim = "
                f"{n_particles} * {spatial_dim}"
            )
        parts = score.reshape(*score.shape[:-1], n_particles, spatial_dim)
    else:
        parts = score
    norm = parts.norm(dim=-1, keepdim=True)
    if isinstance(max_norm, Tensor):
        max_norm = max_norm.to(score.dtype).reshape(*max_norm.shape, *([1] * (norm.ndim - max_norm.ndim)))
    scale = (max_norm / norm.clamp_min(torch.finfo(score.dtype).tiny)).clamp(max=1.0)
    return (parts * scale).reshape(score.shape)


def clip_for(energy: Energy, score: Tensor, max_norm: float | Tensor) -> Tensor:
    """:func:`clip_score` as ``energy``'s shape asks: per particle for a particle system (as iDEM
    clips its targets), per whole vector otherwise. (..., dim) -> (..., dim)."""
    if energy.is_particle_system:
        return clip_score(score, max_norm, n_particles=energy.n_particles, spatial_dim=energy.spatial_dim)
    return clip_score(score, max_norm)


def mc_score(
    energy: Energy,
    x_t: Tensor,
    sigma: float | Tensor,
    n_samples: int | None = None,
    *,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
    estimator: EstimatorName = "lse",
    richardson: bool = False,
    max_norm: float | Tensor | None = None,
    per_particle: bool = True,
    local_scale: float | None = None,
    compile: bool | None = None,
) -> Tensor:
    """One entry point for the estimators above: (B, dim) -> (B, dim).

    Args:
        energy, x_t, sigma: as in :func:`lse_score`.
        n_samples: K (ignored when ``eps`` is given). With ``richardson`` the estimate uses
            2K copies (draw K per half), i.e. 2K energy evaluations per point.
        eps: explicit noise (B, K, dim); otherwise drawn by :func:`draw_eps` from ``generator``.
        estimator: ``"lse"``, ``"naive"``, ``"jensen"`` or ``"blended"`` (:func:`blended_score`,
            which needs ``local_scale``).
        max_norm: clip the result with :func:`clip_score` (per particle for particle systems
            when ``per_particle``).
        compile: torch.compile for the streamed pass of "lse" and "blended"
            (:func:`boltzlab.kernels.mc_score_estimate`; None decides by size).

    "lse" and "blended" run as one streamed pass of the fused estimator (memory O(B * dim));
    "naive", "jensen" and Richardson extrapolation materialise the copies.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")
    if estimator == "blended" and (local_scale is None or richardson):
        raise ValueError("the blended estimator needs local_scale (and does not combine with richardson)")
    if eps is None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int when eps is not given, got {n_samples!r}")
        if not isinstance(x_t, Tensor) or x_t.ndim != 2:
            raise ValueError(f"x_t must be a tensor of shape (B, {energy.dim})")
    streamed = estimator in ("lse", "blended") and not richardson
    if eps is None and not streamed:
        total = 2 * n_samples if richardson else n_samples
        eps = draw_eps(energy, x_t.shape[0], total, generator, dtype=x_t.dtype, device=x_t.device)
    if estimator == "blended":
        assert local_scale is not None
        out = blended_score(energy, x_t, sigma, eps, local_scale, n_samples=n_samples, generator=generator,
                            compile=compile)
    elif streamed:
        # with eps None the noise is drawn chunk by chunk inside the pass (same numbers as draw_eps)
        given = eps is not None
        out = mc_score_estimate(energy, x_t, sigma, None if given else n_samples, noise=eps,
                                generator=None if given else generator, compile=compile).score
    elif richardson:
        out = richardson_score(energy, x_t, sigma, eps, estimator)
    else:
        out = {"naive": naive_score, "jensen": jensen_score}[estimator](energy, x_t, sigma, eps)
    if max_norm is not None:
        out = clip_for(energy, out, max_norm) if per_particle else clip_score(out, max_norm)
    return out


def gmm_noised_score(gmm: GaussianMixture, x: Tensor, sigma: float | Tensor) -> Tensor:
    """Exact grad log p_t(x) for p a :class:`~boltzlab.energies.GaussianMixture` at kT = 1.

    p * N(0, sigma^2 I) = (1/M) sum_m N(mu_m, (s^2 + sigma^2) I), so with v = s^2 + sigma^2

        grad log p_t(x) = sum_m r_m(x) (mu_m - x) / v,   r_m = softmax_m(-|x - mu_m|^2 / (2 v)).

    Shapes: x (B, dim), sigma float or (B,) -> (B, dim)."""
    if not isinstance(gmm, GaussianMixture):
        raise ValueError(f"gmm_noised_score needs a GaussianMixture, got {type(gmm).__name__}")
    if gmm.kT != 1.0:
        raise ValueError(f"at kT = {gmm.kT} the density p^(1/kT) is not a Gaussian mixture; use kT = 1")
    inputs = check_score_inputs(gmm, x, sigma, 1, None, None)
    v = (gmm.std**2 + inputs.sigma**2)[:, None]  # (B, 1)
    mu = gmm.means.to(dtype=inputs.x_t.dtype, device=inputs.x_t.device)
    diff = mu[None] - inputs.x_t[:, None, :]  # (B, M, dim)
    resp = torch.softmax(-(diff**2).sum(-1) / (2 * v), dim=-1)
    return (resp[..., None] * diff).sum(1) / v


def noised_mixture(gmm: GaussianMixture, sigma: float) -> GaussianMixture:
    """The exact noised density p_sigma = p * N(0, sigma^2 I) of a Gaussian mixture ``gmm`` at
    kT = 1, as a mixture again: the same means with width sqrt(s^2 + sigma^2). Its ``log_prob``,
    ``score`` and ``sample`` are the exact answers a diffusion model is measured against."""
    if not isinstance(gmm, GaussianMixture):
        raise ValueError(f"noised_mixture needs a GaussianMixture, got {type(gmm).__name__}")
    if gmm.kT != 1.0:
        raise ValueError(f"at kT = {gmm.kT} the density p^(1/kT) is not a Gaussian mixture; use kT = 1")
    if not (math.isfinite(float(sigma)) and float(sigma) >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    return GaussianMixture(name=f"{gmm.name} noised at sigma = {float(sigma):.3g}", dim=gmm.dim, means=gmm.means,
                           std=math.sqrt(gmm.std**2 + float(sigma) ** 2))


def gmm_posterior_mean(gmm: GaussianMixture, x: Tensor, sigma: float | Tensor) -> Tensor:
    """E[x_0 | x_t = x] for x_0 ~ ``gmm`` (kT = 1) and x_t = x_0 + sigma eps, by Bayes per component:

        E[x_0 | x_t] = sum_m r_m(x_t) (sigma^2 mu_m + s^2 x_t) / (s^2 + sigma^2),

    with r_m the responsibilities of the noised mixture. Computed without the score, so it is an
    independent check of Tweedie's formula. Shapes: x (B, dim), sigma float or (B,) -> (B, dim)."""
    if not isinstance(gmm, GaussianMixture):
        raise ValueError(f"gmm_posterior_mean needs a GaussianMixture, got {type(gmm).__name__}")
    if gmm.kT != 1.0:
        raise ValueError(f"at kT = {gmm.kT} the density p^(1/kT) is not a Gaussian mixture; use kT = 1")
    inputs = check_score_inputs(gmm, x, sigma, 1, None, None)
    s2, sig2 = gmm.std**2, (inputs.sigma**2)[:, None, None]  # (B, 1, 1)
    mu = gmm.means.to(dtype=inputs.x_t.dtype, device=inputs.x_t.device)[None]  # (1, M, dim)
    x_t = inputs.x_t[:, None, :]
    resp = torch.softmax(-((mu - x_t) ** 2).sum(-1) / (2 * (s2 + sig2[..., 0])), dim=-1)  # (B, M)
    component_means = (sig2 * mu + s2 * x_t) / (s2 + sig2)  # (B, M, dim)
    return (resp[..., None] * component_means).sum(1)


@dataclass(frozen=True)
class EstimatorError:
    """Error of a score estimator against the exact score, averaged over points.

    For each point, R independent estimates S^(r) (each with K fresh copies) give
    ``bias2`` = |mean_r S^(r) - s|^2, ``variance`` = sum over coordinates of the unbiased
    sample variance over r, and ``mse`` = mean_r |S^(r) - s|^2 (mse ≈ bias2 + variance;
    bias2 carries an extra variance/R of sampling noise). ``relative_mse`` = mse / mean |s|^2.
    ``n_nonfinite``: estimates with NaN or inf entries (left out of the averages).
    """

    mse: float
    bias2: float
    variance: float
    relative_mse: float
    n_nonfinite: int


def estimator_error(
    energy: Energy,
    x_t: Tensor,
    sigma: float,
    exact: Tensor,
    n_samples: int,
    n_repeats: int,
    *,
    estimator: EstimatorName = "lse",
    richardson: bool = False,
    generator: torch.Generator | None = None,
) -> EstimatorError:
    """Bias and variance of :func:`mc_score` at points ``x_t`` (B, dim) with exact score
    ``exact`` (B, dim), from ``n_repeats`` independent estimates per point (R >= 2).
    With ``richardson`` each estimate uses 2 * n_samples copies."""
    if n_repeats < 2:
        raise ValueError(f"n_repeats must be >= 2 to measure a variance, got {n_repeats}")
    if exact.shape != x_t.shape:
        raise ValueError(f"exact has shape {tuple(exact.shape)}, expected x_t's shape {tuple(x_t.shape)}")
    batch = x_t.shape[0]
    repeated = x_t.repeat(n_repeats, 1)  # (R * B, dim), repeat r holds rows r*B ... r*B + B - 1
    est = mc_score(energy, repeated, sigma, n_samples, generator=generator, estimator=estimator,
                   richardson=richardson).reshape(n_repeats, batch, -1).to(torch.float64)
    ok = torch.isfinite(est).all(dim=-1).all(dim=0)  # (B,) points whose R estimates are all finite
    n_bad = int(n_repeats * batch - torch.isfinite(est).all(dim=-1).sum())
    if not bool(ok.any()):
        nan = float("nan")
        return EstimatorError(nan, nan, nan, nan, n_bad)
    est, ref = est[:, ok], exact[ok].to(torch.float64)
    mse = float(((est - ref) ** 2).sum(-1).mean())
    bias2 = float(((est.mean(0) - ref) ** 2).sum(-1).mean())
    variance = float(est.var(0).sum(-1).mean())
    return EstimatorError(mse, bias2, variance, mse / float((ref**2).sum(-1).mean()), n_bad)


def score_quality_by_dimension(
    dim: int,
    n_points: int,
    n_samples: int,
    *,
    sigma: float = 1.0,
    generator: torch.Generator | None = None,
    max_noise_elements: int = 1 << 27,
) -> dict[str, float]:
    r"""How the LSE and Jensen estimators degrade with dimension, on p = N(0, I_d) at kT = 1.

    There the noised score is exact, grad log p_t(x) = -x / (1 + sigma^2), and the log-weights
    l_k = -|x + sigma eps_k|^2 / 2 of the K copies spread by O(sigma sqrt(d)), so the Kish ESS
    of the softmax weights falls towards 1 as d grows. ``n_points`` noised points
    x_t = x_0 + sigma z are drawn first, then the noise eps (n_points, K, dim) in chunks of
    points holding at most ``max_noise_elements`` entries (d = 10^4 with K = 2048 would need
    21 GB at once); both estimators see the same copies.

    Returns the means over points of ``"ess"`` (Kish ESS of the weights, out of K),
    ``"cos_lse"``, ``"cos_jensen"`` (cosine similarity to the exact score) and ``"ratio_lse"``,
    ``"ratio_jensen"`` (|estimate| / |exact score|; Jensen's estimate is -x/1, so about 1 + sigma^2).
    """
    if dim < 1 or n_points < 1 or n_samples < 1:
        raise ValueError(f"need dim, n_points, n_samples >= 1, got {dim}, {n_points}, {n_samples}")
    gauss = GaussianMixture(name=f"gauss{dim}", dim=dim, means=torch.zeros(1, dim), std=1.0)
    x_t = gauss.sample(n_points, generator) + sigma * torch.randn(n_points, dim, generator=generator)
    exact = gmm_noised_score(gauss, x_t, sigma)
    step = max(1, max_noise_elements // (n_samples * dim))
    sums = dict.fromkeys(("ess", "cos_lse", "cos_jensen", "ratio_lse", "ratio_jensen"), 0.0)
    for b0 in range(0, n_points, step):
        x, ref = x_t[b0:b0 + step], exact[b0:b0 + step]
        eps = torch.randn(x.shape[0], n_samples, dim, generator=generator)
        sums["ess"] += float(mc_score_estimate(gauss, x, sigma, noise=eps, backend="reference").ess.sum())
        for est in ("lse", "jensen"):
            score = mc_score(gauss, x, sigma, eps=eps, estimator=est)
            sums[f"cos_{est}"] += float(torch.nn.functional.cosine_similarity(score, ref, dim=-1).sum())
            sums[f"ratio_{est}"] += float((score.norm(dim=-1) / ref.norm(dim=-1)).sum())
        del eps
    return {key: value / n_points for key, value in sums.items()}
