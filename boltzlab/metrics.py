r"""Metrics that compare a sampler's output with a target or with reference samples.

Every function takes torch tensors (any device, float32 or float64) and returns Python
floats or small CPU tensors; the arithmetic is done in float64 so that metrics of
float32 samples are not limited by float32 rounding.

============================  ============================================================
distributions of scalars      :func:`wasserstein_1d`, :func:`energy_w2`,
                              :func:`weighted_wasserstein_1d` (importance-weighted sample),
                              :func:`wasserstein_1d_by_quantile` (where W_p comes from)
histograms                    :func:`histogram`, :func:`histogram_tvd`
interatomic distances         :func:`interatomic_distances`, :func:`distance_histogram`,
                              :func:`distance_w2`, :func:`distance_tvd`,
                              :func:`distance_w2_by_quantile`, :func:`cluster_radius`,
                              :func:`share_beyond_radius`
configurations                :func:`x_w2` (exact optimal transport; saturates in high d)
importance weights            :func:`self_normalized_weights`, :func:`kish_ess`,
                              :func:`normalized_ess`, :func:`log_z_estimate`,
                              :func:`log_z_error`
modes                         :func:`mode_coverage`
averages                      :func:`mean_energy_with_se`
============================  ============================================================

Wasserstein distances are reported as W_p, not W_p^p: ``energy_w2`` is in units of energy.

Bad input (empty tensors, NaN or infinite values, wrong shapes) raises a
:class:`MetricInputError`, a ``ValueError`` that says what is wrong and how often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import chi2
from torch import Tensor

__all__ = [
    "MetricInputError",
    "wasserstein_1d",
    "QuantileBand",
    "DISTANCE_QUANTILE_EDGES",
    "wasserstein_1d_by_quantile",
    "energy_w2",
    "weighted_wasserstein_1d",
    "interatomic_distances",
    "Histogram",
    "histogram",
    "distance_histogram",
    "distance_w2",
    "distance_w2_by_quantile",
    "cluster_radius",
    "share_beyond_radius",
    "distance_tvd",
    "histogram_tvd",
    "x_w2",
    "self_normalized_weights",
    "kish_ess",
    "normalized_ess",
    "log_z_estimate",
    "log_z_error",
    "mode_coverage",
    "mean_energy_with_se",
]


class MetricInputError(ValueError):
    """Raised when a metric is given input it cannot evaluate honestly."""


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------


def _as_tensor(values: Tensor, name: str) -> Tensor:
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    if not isinstance(values, Tensor):
        raise MetricInputError(f"{name}: expected a torch.Tensor, got {type(values).__name__}")
    if values.is_complex():
        raise MetricInputError(f"{name}: complex values are not supported")
    return values


def _finite_1d(values: Tensor, name: str, what: str = "values") -> Tensor:
    """Flatten to a float64 CPU vector; reject empty input and NaN/inf, counting them."""
    v = _as_tensor(values, name).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    if v.numel() == 0:
        raise MetricInputError(f"{name}: no {what} (empty tensor)")
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        n_nan = int(torch.isnan(v).sum())
        n_inf = int(bad.sum()) - n_nan
        raise MetricInputError(
            f"{name}: {int(bad.sum())} of {v.numel()} {what} are not finite "
            f"({n_nan} NaN, {n_inf} inf); a sampler that produces them has diverged. "
            f"Report that count, and pass v[torch.isfinite(v)] if you still want the metric "
            f"of the rest."
        )
    return v


def _finite_2d(x: Tensor, name: str) -> Tensor:
    """A float64 CPU matrix of shape (n, dim) with finite entries and n >= 1."""
    x = _as_tensor(x, name).detach()
    if x.ndim != 2:
        raise MetricInputError(f"{name}: expected shape (n_samples, dim), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise MetricInputError(f"{name}: no samples (empty tensor)")
    x = x.to(device="cpu", dtype=torch.float64)
    bad_rows = ~torch.isfinite(x).all(dim=1)
    if bool(bad_rows.any()):
        raise MetricInputError(
            f"{name}: {int(bad_rows.sum())} of {x.shape[0]} samples contain NaN or inf coordinates"
        )
    return x


def _log_weights(log_w: Tensor, name: str = "log_w") -> Tensor:
    """Float64 CPU vector of log-weights. -inf (weight zero) is allowed; NaN and +inf are not."""
    lw = _as_tensor(log_w, name).detach()
    if lw.ndim != 1:
        raise MetricInputError(f"{name}: expected a 1-D tensor of log-weights, got shape {tuple(lw.shape)}")
    if lw.numel() == 0:
        raise MetricInputError(f"{name}: no log-weights (empty tensor)")
    lw = lw.to(device="cpu", dtype=torch.float64)
    n_nan = int(torch.isnan(lw).sum())
    n_posinf = int((lw == math.inf).sum())
    if n_nan or n_posinf:
        raise MetricInputError(
            f"{name}: {n_nan} NaN and {n_posinf} +inf of {lw.numel()} log-weights; "
            f"check the model's log-density and the energies of those samples"
        )
    if bool((lw == -math.inf).all()):
        raise MetricInputError(f"{name}: every weight is zero (all log-weights are -inf)")
    return lw


# ----------------------------------------------------------------------------------------
# 1-D Wasserstein distances
# ----------------------------------------------------------------------------------------


def wasserstein_1d(a: Tensor, b: Tensor, p: float = 2.0) -> float:
    r"""Exact p-Wasserstein distance W_p between two 1-D empirical distributions.

    ``a`` has n values and ``b`` has m values (any shapes; they are flattened; n != m is
    fine), each value with weight 1/n resp. 1/m. In one dimension the optimal coupling
    is monotone, so

        W_p(a, b) = ( ∫_0^1 |F_a^{-1}(u) - F_b^{-1}(u)|^p du )^{1/p},

    where F^{-1} is the empirical quantile function: F_a^{-1}(u) = a_(k) (the k-th
    smallest value) for u in ((k-1)/n, k/n]. Both quantile functions are piecewise
    constant, so the integral is an exact finite sum over the union of the breakpoints
    {i/n} ∪ {j/m}. The breakpoints are handled as integers (i·m and j·n over n·m), so
    the result is exact up to float64 rounding for any n and m.

    Returns W_p (not W_p^p), in the units of the values. Cost: O((n + m) log(n + m)).
    """
    _check_p(p)
    _, du, diff = _quantile_steps(a, b)
    return float((du * diff.abs().pow(p)).sum().pow(1.0 / p))


def _check_p(p: float) -> None:
    if not (p >= 1 and math.isfinite(p)):
        raise MetricInputError(f"p must be a finite number >= 1, got {p}")


def _quantile_steps(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The intervals [u, u + du) on which both empirical quantile functions are constant, and
    F_a^{-1}(u) - F_b^{-1}(u) on each: three float64 tensors (u, du, difference) of one length."""
    a_sorted = torch.sort(_finite_1d(a, "a")).values
    b_sorted = torch.sort(_finite_1d(b, "b")).values
    n, m = a_sorted.numel(), b_sorted.numel()
    if n == m:
        return torch.arange(n, dtype=torch.float64) / n, torch.full((n,), 1.0 / n, dtype=torch.float64), a_sorted - b_sorted
    # breakpoints u = k / (n m) with k in {i m} ∪ {j n}; each interval [k_lo, k_hi) lies
    # inside one quantile step of a (index k_lo // m) and one of b (index k_lo // n)
    k = torch.unique(torch.cat([torch.arange(n + 1) * m, torch.arange(m + 1) * n]))
    k_lo, du = k[:-1], torch.diff(k).to(torch.float64) / (n * m)
    return k_lo.to(torch.float64) / (n * m), du, a_sorted[k_lo // m] - b_sorted[k_lo // n]


@dataclass(frozen=True)
class QuantileBand:
    """One band [lo, hi) of quantile levels u and what it adds to W_p^p = ∫_0^1 |F_a^{-1} - F_b^{-1}|^p du."""

    lo: float
    hi: float
    wp_p: float  # ∫_lo^hi |F_a^{-1}(u) - F_b^{-1}(u)|^p du: the bands' values add up to W_p^p
    share: float  # wp_p / W_p^p (0 where W_p = 0)
    mean_difference: float  # (1 / (hi - lo)) ∫_lo^hi (F_a^{-1}(u) - F_b^{-1}(u)) du: > 0 where a is larger


DISTANCE_QUANTILE_EDGES = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0)


def wasserstein_1d_by_quantile(a: Tensor, b: Tensor, edges: tuple[float, ...] = DISTANCE_QUANTILE_EDGES,
                               p: float = 2.0) -> list[QuantileBand]:
    r"""Where in the distribution W_p between two 1-D samples comes from: W_p^p split into bands
    of quantile levels, :math:`W_p^p = \sum_j \int_{e_j}^{e_{j+1}} |F_a^{-1}(u) - F_b^{-1}(u)|^p du`
    (the same exact sum over quantile steps as :func:`wasserstein_1d`, each step cut at the band
    edges). ``edges`` run from 0 to 1, increasing. A shift of the bulk shows up in the middle
    bands; missing or extra tails in the outer ones, with the sign of ``mean_difference``."""
    _check_p(p)
    e = [float(x) for x in edges]
    if len(e) < 2 or e[0] != 0.0 or e[-1] != 1.0 or any(hi <= lo for lo, hi in zip(e, e[1:])):
        raise MetricInputError(f"edges must increase from 0 to 1, got {tuple(edges)}")
    u, du, diff = _quantile_steps(a, b)
    total = float((du * diff.abs().pow(p)).sum())
    bands = []
    for lo, hi in zip(e, e[1:]):
        overlap = (torch.minimum(u + du, torch.tensor(hi, dtype=torch.float64))
                   - torch.maximum(u, torch.tensor(lo, dtype=torch.float64))).clamp(min=0.0)
        wp_p = float((overlap * diff.abs().pow(p)).sum())
        bands.append(QuantileBand(lo, hi, wp_p, wp_p / total if total > 0 else 0.0,
                                  float((overlap * diff).sum()) / (hi - lo)))
    return bands


def weighted_wasserstein_1d(a: Tensor, log_w_a: Tensor, b: Tensor, p: float = 2.0) -> float:
    r"""Exact W_p between a WEIGHTED 1-D sample and an unweighted one.

    ``a`` ``(n,)`` carries self-normalised weights w̄ = softmax(``log_w_a``) (e.g. importance
    weights), ``b`` ``(m,)`` weights 1/m. As in :func:`wasserstein_1d`, W_p^p is the integral
    of |F_a^{-1}(u) - F_b^{-1}(u)|^p over u in (0, 1), where F_a^{-1} now steps at the
    cumulative weights of the sorted a; the integral is an exact sum over the union of both
    sets of breakpoints. Unlike resampling (``a[importance_resample(...)]``) it adds no
    multinomial noise. With equal weights it equals :func:`wasserstein_1d`. Returns W_p.
    """
    if not (p >= 1 and math.isfinite(p)):
        raise MetricInputError(f"p must be a finite number >= 1, got {p}")
    a = _finite_1d(a, "a")
    lw = _log_weights(log_w_a, "log_w_a")
    if lw.shape != a.shape:
        raise MetricInputError(f"log_w_a: expected shape {tuple(a.shape)} (one per value of a), got {tuple(lw.shape)}")
    b_sorted = torch.sort(_finite_1d(b, "b")).values
    order = torch.argsort(a)
    a_sorted, w = a[order], torch.softmax(lw[order], 0)
    m = b_sorted.numel()
    cum_a = torch.cumsum(w, 0)
    cum_a[-1] = 1.0
    u = torch.unique(torch.cat([torch.zeros(1, dtype=torch.float64), cum_a,
                                torch.arange(1, m + 1, dtype=torch.float64) / m]))
    u = u[u <= 1.0]
    mid = 0.5 * (u[:-1] + u[1:])
    ia = torch.searchsorted(cum_a, mid).clamp_max(a_sorted.numel() - 1)
    ib = torch.floor(mid * m).long().clamp_max(m - 1)
    gaps = (a_sorted[ia] - b_sorted[ib]).abs()
    return float((torch.diff(u) * gaps.pow(p)).sum().pow(1.0 / p))


def energy_w2(e_a: Tensor, e_b: Tensor) -> float:
    r"""Energy W2: the 1-D Wasserstein-2 distance between two sets of energies.

    ``e_a`` of shape ``(n,)`` and ``e_b`` of shape ``(m,)`` (n != m allowed), e.g. the
    energies E(x) of a sampler's output and of reference samples. Returns

        W2 = sqrt( ∫_0^1 (F_a^{-1}(u) - F_b^{-1}(u))^2 du )

    in units of energy. This is W2, NOT W2^2 (some papers report the square; check
    before comparing numbers). Exact, see :func:`wasserstein_1d`.

    Raises :class:`MetricInputError` if either set is empty or holds NaN/inf energies
    (the message says how many): a diverged sample must be reported, not averaged in.
    """
    a = _finite_1d(e_a, "e_a", "energies")
    b = _finite_1d(e_b, "e_b", "energies")
    return wasserstein_1d(a, b, p=2.0)


# ----------------------------------------------------------------------------------------
# interatomic distances
# ----------------------------------------------------------------------------------------


def interatomic_distances(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    r"""All unique pair distances d_ij = |x_i - x_j| (i < j), pooled over samples.

    ``x`` of shape ``(..., n_particles * spatial_dim)`` (particle i at
    ``x[..., i*spatial_dim:(i+1)*spatial_dim]``) gives a flat float64 CPU tensor of
    shape ``(n_samples * n_particles (n_particles - 1) / 2,)``.
    """
    return _pair_distances(x, n_particles, spatial_dim, "x")


def _pair_distances(x: Tensor, n_particles: int, spatial_dim: int, name: str) -> Tensor:
    r = _configurations(x, n_particles, spatial_dim, name)
    i, j = torch.triu_indices(n_particles, n_particles, 1)
    return (r[:, i] - r[:, j]).norm(dim=-1).reshape(-1)


def _configurations(x: Tensor, n_particles: int, spatial_dim: int, name: str) -> Tensor:
    """``x`` of shape (..., n_particles * spatial_dim), checked, as (N, n_particles, spatial_dim)."""
    if n_particles < 2 or spatial_dim < 1:
        raise MetricInputError(f"need n_particles >= 2 and spatial_dim >= 1, got {n_particles}, {spatial_dim}")
    x = _as_tensor(x, name).detach()
    dim = n_particles * spatial_dim
    if x.ndim == 0 or x.shape[-1] != dim:
        raise MetricInputError(
            f"{name}: expected shape (..., {dim}) for {n_particles} particles in {spatial_dim}-D, "
            f"got {tuple(x.shape)}"
        )
    return _finite_2d(x.reshape(-1, dim), name).reshape(-1, n_particles, spatial_dim)


def cluster_radius(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Per configuration, the largest distance of a particle from the configuration's centroid,
    max_i |x_i - (1/n) sum_j x_j|: shape (N,) for ``x`` of shape (N, n_particles * spatial_dim).
    A particle that has left the cluster's surface shows up here long before it moves the pooled
    distance histogram."""
    r = _configurations(x, n_particles, spatial_dim, "x")
    return (r - r.mean(dim=1, keepdim=True)).norm(dim=-1).amax(dim=1)


def share_beyond_radius(x: Tensor, reference: Tensor, n_particles: int, spatial_dim: int,
                        level: float = 0.9) -> float:
    """The share of configurations in ``x`` whose :func:`cluster_radius` exceeds the ``level``
    quantile of the reference's (1 - ``level`` for exact samples, up to sampling noise): too
    small a share means too few particles out of the cluster, too large a cluster that falls apart."""
    if not 0.0 < level < 1.0:
        raise MetricInputError(f"level must lie in (0, 1), got {level}")
    threshold = torch.quantile(cluster_radius(reference, n_particles, spatial_dim), level)
    return float((cluster_radius(x, n_particles, spatial_dim) > threshold).double().mean())


def score_virial(x: Tensor, score: Tensor, n_particles: int | None = None, spatial_dim: int | None = None) -> Tensor:
    r"""Per sample, the virial of a score, (x - c) . s(x): shape (N,) for ``x`` and ``score`` of
    shape (N, dim). For a particle system c is each configuration's centroid; otherwise c = 0.

    Integration by parts (Stein's identity) gives, for x ~ p with p smooth and decaying,

        E_p[(x - c) . grad log p(x)] = -d_free,

    d_free = (n_particles - 1) * spatial_dim for centre-of-mass-free particles, dim otherwise
    (:func:`virial_expectation`), whatever p is. So the mean virial of a score at exact samples
    of p_t checks it without knowing p_t: above -d_free the score pushes particles apart on
    average, below it pulls them together.
    """
    if x.ndim != 2 or score.shape != x.shape:
        raise MetricInputError(f"x and score must have the same shape (N, dim), got {tuple(x.shape)} and "
                               f"{tuple(score.shape)}")
    if n_particles is None:
        return (_finite_2d(_as_tensor(x, "x").detach(), "x") * _finite_2d(_as_tensor(score, "score").detach(), "score")).sum(dim=1)
    if spatial_dim is None:
        raise MetricInputError("give spatial_dim with n_particles")
    r = _configurations(x, n_particles, spatial_dim, "x")
    s = _configurations(score, n_particles, spatial_dim, "score")
    return ((r - r.mean(dim=1, keepdim=True)) * s).sum(dim=(1, 2))


def virial_expectation(dim: int, n_particles: int | None = None, spatial_dim: int | None = None) -> float:
    """The exact E_p[(x - c) . grad log p] of :func:`score_virial`: -(n_particles - 1) * spatial_dim
    for a centre-of-mass-free particle system, -dim otherwise."""
    if n_particles is None:
        return -float(dim)
    if spatial_dim is None or n_particles * spatial_dim != dim:
        raise MetricInputError(f"{n_particles} particles in {spatial_dim} dimensions do not make dim {dim}")
    return -float((n_particles - 1) * spatial_dim)


@dataclass(frozen=True)
class Histogram:
    """A normalised histogram that keeps track of the mass outside its range.

    ``probs[k]`` is the fraction of ALL values in bin k (``edges[k]``, ``edges[k+1]``);
    ``below`` and ``above`` are the fractions outside the range, so
    ``probs.sum() + below + above == 1``.
    """

    edges: Tensor  # (bins + 1,)
    probs: Tensor  # (bins,)
    below: float
    above: float
    n_values: int

    @property
    def density(self) -> Tensor:
        """probs / bin width: ``(bins,)``, integrates to the in-range fraction."""
        return self.probs / torch.diff(self.edges)

    @property
    def centres(self) -> Tensor:
        """Bin centres: ``(bins,)``."""
        return 0.5 * (self.edges[1:] + self.edges[:-1])


def histogram(values: Tensor, bins: int, range: tuple[float, float]) -> Histogram:
    """Histogram of any finite values (flattened) on ``bins`` equal bins over ``range``;
    see :class:`Histogram` for the normalisation."""
    values = _finite_1d(values, "values")
    lo, hi = float(range[0]), float(range[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise MetricInputError(f"range must be two finite numbers lo < hi, got {range}")
    if bins < 1:
        raise MetricInputError(f"bins must be a positive integer, got {bins}")
    v = values.numpy()
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    n = v.size
    return Histogram(
        edges=torch.from_numpy(edges),
        probs=torch.from_numpy(counts / n),
        below=float(np.count_nonzero(v < lo) / n),
        above=float(np.count_nonzero(v > hi) / n),
        n_values=n,
    )


def _values_or_distances(x_or_d: Tensor, n_particles: int | None, spatial_dim: int | None, name: str) -> Tensor:
    if (n_particles is None) != (spatial_dim is None):
        raise MetricInputError("give both n_particles and spatial_dim (configurations) or neither (distances)")
    if n_particles is None:
        return _finite_1d(x_or_d, name, "distances")
    return _pair_distances(x_or_d, n_particles, spatial_dim, name)  # type: ignore[arg-type]


def distance_histogram(
    x_or_d: Tensor,
    bins: int = 100,
    range: tuple[float, float] | None = None,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
) -> Histogram:
    """Histogram of interatomic distances.

    ``x_or_d`` is either configurations of shape ``(n_samples, n_particles * spatial_dim)``
    (then give ``n_particles`` and ``spatial_dim``) or distances of any shape. ``range``
    defaults to the min and max distance. See :class:`Histogram` for the normalisation.
    """
    d = _values_or_distances(x_or_d, n_particles, spatial_dim, "x_or_d")
    if range is None:
        lo, hi = float(d.min()), float(d.max())
        range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    return histogram(d, bins, range)


def distance_w2(x_a: Tensor, x_b: Tensor, n_particles: int, spatial_dim: int) -> float:
    r"""W2 (not W2^2) between the pooled interatomic-distance distributions of two sample sets.

    ``x_a`` of shape ``(n, n_particles * spatial_dim)``, ``x_b`` of shape ``(m, ...)``;
    the n·P and m·P distances (P = n_particles (n_particles - 1) / 2) are compared with
    the exact 1-D W2 of :func:`wasserstein_1d`. Invariant to rotations, translations
    and permutations of particles, as the energy is.
    """
    d_a = _pair_distances(x_a, n_particles, spatial_dim, "x_a")
    d_b = _pair_distances(x_b, n_particles, spatial_dim, "x_b")
    return wasserstein_1d(d_a, d_b, p=2.0)


def distance_w2_by_quantile(x_a: Tensor, x_b: Tensor, n_particles: int, spatial_dim: int,
                            edges: tuple[float, ...] = DISTANCE_QUANTILE_EDGES) -> list[QuantileBand]:
    """:func:`distance_w2` squared, split into bands of quantile levels of the pooled distances
    (:func:`wasserstein_1d_by_quantile`): whether a sampler's distance error is a stretched
    bulk (bands 0.1-0.9) or a missing tail of far-apart pairs (bands above 0.99)."""
    d_a = _pair_distances(x_a, n_particles, spatial_dim, "x_a")
    d_b = _pair_distances(x_b, n_particles, spatial_dim, "x_b")
    return wasserstein_1d_by_quantile(d_a, d_b, edges)


def histogram_tvd(h_a: Histogram, h_b: Histogram) -> float:
    r"""Total variation distance between two histograms on the same bins:

        TVD = 0.5 · Σ_k |p_k - q_k|   (including the below-range and above-range masses),

    between 0 (identical) and 1 (disjoint).
    """
    if h_a.edges.shape != h_b.edges.shape or not torch.equal(h_a.edges, h_b.edges):
        raise MetricInputError("histogram_tvd needs two histograms with identical bin edges")
    in_range = (h_a.probs - h_b.probs).abs().sum()
    outside = abs(h_a.below - h_b.below) + abs(h_a.above - h_b.above)
    return float(0.5 * (in_range + outside))


def distance_tvd(
    x_a: Tensor,
    x_b: Tensor,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
    bins: int = 100,
    range: tuple[float, float] | None = None,
) -> float:
    r"""Total variation distance between the interatomic-distance histograms of two sets.

    Both sets are binned on shared bins (``range`` defaults to the min and max over both
    sets, so nothing falls outside), normalised to probabilities p and q, and

        TVD = 0.5 · Σ_k |p_k - q_k|   in [0, 1].

    With configurations give ``n_particles`` and ``spatial_dim``; without them ``x_a`` and
    ``x_b`` are taken to be distances already. The value depends on ``bins`` and on the
    sample sizes (finite-sample noise adds about sqrt(bins / n) even for identical
    distributions), so compare TVDs only at equal bins and sample sizes.
    """
    d_a = _values_or_distances(x_a, n_particles, spatial_dim, "x_a")
    d_b = _values_or_distances(x_b, n_particles, spatial_dim, "x_b")
    if range is None:
        lo = float(min(d_a.min(), d_b.min()))
        hi = float(max(d_a.max(), d_b.max()))
        range = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
    return histogram_tvd(histogram(d_a, bins, range), histogram(d_b, bins, range))


# ----------------------------------------------------------------------------------------
# configuration-space W2
# ----------------------------------------------------------------------------------------


def _subsample(x: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    if x.shape[0] == n:
        return x
    idx = torch.randperm(x.shape[0], generator=generator)[:n]
    return x[idx]


def x_w2(
    x_a: Tensor,
    x_b: Tensor,
    max_samples: int = 2000,
    generator: torch.Generator | None = None,
) -> float:
    r"""W2 (not W2^2) between two sets of configurations, by exact optimal transport.

    ``x_a`` of shape ``(n, dim)``, ``x_b`` of shape ``(m, dim)``. Both sets are cut to the
    same size k = min(n, m, max_samples) by drawing without replacement (with
    ``generator``; a set of exactly k samples is used whole), and then

        W2 = sqrt( min_σ (1/k) Σ_i |a_i - b_σ(i)|^2 )

    over permutations σ, solved exactly with the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) on the k×k squared-distance matrix.
    Cost O(k^3) time, O(k^2) memory: k = 2000 takes about a second.

    Known weakness (taught in chapter 00): in high dimension this metric saturates.
    The W2 between two finite samples of the SAME distribution shrinks only like
    k^(-1/dim): in 39 dimensions (LJ-13) two independent sets of 2000 standard Gaussian
    samples are still W2 ≈ 6.3 apart, not far below the typical distance between two
    single samples (sqrt(2 · 39) ≈ 8.8), so a floor of finite-sample noise hides real
    differences between samplers. Report it with that floor (two reference sets
    against each other). It also measures raw coordinates, so it sees rotations and
    particle relabellings that do not change the energy. Use it next to the energy and
    distance metrics, never alone.
    """
    a = _finite_2d(x_a, "x_a")
    b = _finite_2d(x_b, "x_b")
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(f"x_a and x_b have different dimensions: {a.shape[1]} vs {b.shape[1]}")
    if max_samples < 1:
        raise MetricInputError(f"max_samples must be positive, got {max_samples}")
    k = min(a.shape[0], b.shape[0], max_samples)
    a, b = _subsample(a, k, generator), _subsample(b, k, generator)
    # the direct kernel, not the matmul expansion, so that identical points cost exactly 0
    cost = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(max(cost[rows, cols].mean(), 0.0)))


# ----------------------------------------------------------------------------------------
# importance weights
# ----------------------------------------------------------------------------------------


def self_normalized_weights(log_w: Tensor) -> Tensor:
    r"""w̄_i = w_i / Σ_j w_j = softmax(log_w)_i.

    ``log_w`` of shape ``(n,)``, e.g. log w = -E(x)/kT - log q(x) for samples x ~ q.
    Returns shape ``(n,)`` in ``log_w``'s dtype (computed in float64), summing to 1.
    """
    log_w = _as_tensor(log_w, "log_w")
    dtype = log_w.dtype if log_w.is_floating_point() else torch.float64
    return torch.softmax(_log_weights(log_w), dim=0).to(dtype)


def kish_ess(log_w: Tensor) -> float:
    r"""Kish effective sample size from log-weights ``(n,)``:

        ESS = (Σ w_i)^2 / Σ w_i^2 = exp(2 · logsumexp(log w) - logsumexp(2 log w)),

    computed in log space so log-weights of any magnitude (e.g. 1e4) are fine and the
    result is invariant to adding a constant to ``log_w``. Between 1 (one weight
    dominates) and n (equal weights). Meaningful only for a large enough n (use at
    least 1000 samples): with few samples the heaviest weights are simply not seen.
    """
    lw = _log_weights(log_w)
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def normalized_ess(log_w: Tensor) -> float:
    """Kish ESS divided by the number of samples n, in [1/n, 1]. See :func:`kish_ess`."""
    lw = _log_weights(log_w)
    return kish_ess(lw) / lw.numel()


def log_z_estimate(log_w: Tensor) -> tuple[float, float]:
    r"""Importance-sampling estimate of log Z and its standard error.

    With samples x_i ~ q and log w_i = -E(x_i)/kT - log q(x_i), Z = E_q[w] and

        log Ẑ = log( (1/n) Σ w_i ) = logsumexp(log w) - log n.

    Standard error by the delta method, SE(log Ẑ) ≈ sd(w) / (sqrt(n) · mean(w)); written
    with the Kish ESS (sample variance with n - 1) this is

        SE = sqrt( (n / ESS - 1) / (n - 1) ),

    which needs no exponentiation of large log-weights. ``log_w`` of shape ``(n,)``, n >= 2.

    Caveats: log Ẑ is biased low (Jensen: E[log Ẑ] <= log Z), and when the weights are
    heavy-tailed the SE itself is underestimated: a small SE is not proof of a good
    estimate unless the ESS is large too.
    """
    lw = _log_weights(log_w)
    n = lw.numel()
    if n < 2:
        raise MetricInputError("log_z_estimate needs at least 2 log-weights for a standard error")
    estimate = float(torch.logsumexp(lw, 0)) - math.log(n)
    ess = kish_ess(lw)
    se = math.sqrt(max(n / ess - 1.0, 0.0) / (n - 1))
    return estimate, se


def log_z_error(log_w: Tensor, log_z_true: float) -> float:
    """Signed error log Ẑ - log Z of :func:`log_z_estimate` (usually negative, see there)."""
    if not math.isfinite(log_z_true):
        raise MetricInputError(f"log_z_true must be finite, got {log_z_true}")
    return log_z_estimate(log_w)[0] - float(log_z_true)


# ----------------------------------------------------------------------------------------
# modes and averages
# ----------------------------------------------------------------------------------------


def mode_coverage(
    x: Tensor,
    means: Tensor,
    std: float,
    min_fraction: float = 0.2,
    radius_quantile: float = 0.999,
) -> tuple[int, Tensor]:
    r"""How many modes of an isotropic Gaussian mixture a sample set covers.

    ``x`` of shape ``(N, d)``, ``means`` of shape ``(M, d)``, ``std`` the components'
    standard deviation (for GMM-40: ``GaussianMixture().means`` and ``.std``).

    Each sample is assigned to its nearest mean, and it counts for that mode only if it
    is also close to it: |x - mu|^2 / std^2 <= r^2, where r^2 is the ``radius_quantile``
    quantile of the chi-squared distribution with d degrees of freedom, so that an exact
    sample of that mode counts with probability ``radius_quantile`` (r = 3.72 std in
    2-D). Samples between modes or far away count for none. Mode m is covered when

        counts[m] >= min_fraction · N / M,

    i.e. it received at least ``min_fraction`` of its expected share of samples (equal
    weights). The default 0.2 keeps exact samples at 40/40 with overwhelming
    probability once N / M >= 25, while a sampler that leaves a mode nearly empty does
    not get credit for a few stray points.

    GMM-40 has a few pairs of means closer than about 2 std (e.g. modes 22 and 29 are
    1.18 apart, less than one std): such a pair is effectively one blob, and samples of
    either member are shared between both, so they are covered (or missed) together.

    Returns ``(n_covered, counts)`` with ``counts`` a long tensor of shape ``(M,)``.
    """
    xs = _finite_2d(x, "x")
    mu = _finite_2d(means, "means")
    if xs.shape[1] != mu.shape[1]:
        raise MetricInputError(f"x has dimension {xs.shape[1]} but means have {mu.shape[1]}")
    if not (std > 0 and math.isfinite(std)):
        raise MetricInputError(f"std must be positive and finite, got {std}")
    if not 0 < min_fraction:
        raise MetricInputError(f"min_fraction must be positive, got {min_fraction}")
    if not 0 < radius_quantile < 1:
        raise MetricInputError(f"radius_quantile must be in (0, 1), got {radius_quantile}")
    n, n_modes = xs.shape[0], mu.shape[0]
    d2 = torch.cdist(xs, mu).pow(2)  # (N, M)
    nearest_d2, nearest = d2.min(dim=1)
    r2 = float(chi2.ppf(radius_quantile, df=xs.shape[1])) * std**2
    counts = torch.bincount(nearest[nearest_d2 <= r2], minlength=n_modes)
    covered = counts >= min_fraction * n / n_modes
    return int(covered.sum()), counts


def mean_energy_with_se(e: Tensor, tau: float = 1.0) -> tuple[float, float]:
    r"""Mean of energies ``(n,)`` and its standard error sqrt(tau · s^2 / n).

    ``tau`` is the integrated autocorrelation time of the series (1 for independent
    samples; MCMC output needs its measured tau). s^2 is the sample variance (n - 1).
    """
    v = _finite_1d(e, "e", "energies")
    if v.numel() < 2:
        raise MetricInputError("mean_energy_with_se needs at least 2 energies")
    if not (tau > 0 and math.isfinite(tau)):
        raise MetricInputError(f"tau (integrated autocorrelation time) must be positive, got {tau}")
    return float(v.mean()), float(math.sqrt(tau * float(v.var()) / v.numel()))


def count_transitions(coordinate: Tensor, low: float, high: float) -> Tensor:
    r"""Transitions between two basins seen in scalar traces, counted core to core.

    ``coordinate`` of shape ``(n_steps, n_chains)`` (e.g. x1 of double-well chains). A chain
    is in basin A while coordinate < ``low`` and in basin B while coordinate > ``high``;
    in between it keeps the basin it was last in, so that recrossings of the barrier top
    are not counted as transitions. Returns the number of A <-> B switches per chain,
    ``(n_chains,)`` long. The mean tunnelling time is then (n_steps · n_chains) / total.
    """
    c = _as_tensor(coordinate, "coordinate")
    if c.ndim == 1:
        c = c.unsqueeze(-1)
    if c.ndim != 2:
        raise ValueError(f"coordinate must have shape (n_steps, n_chains), got {tuple(c.shape)}")
    if not low < high:
        raise ValueError(f"need low < high for the two basin cores, got low={low}, high={high}")
    state = torch.zeros(c.shape, dtype=torch.long)
    state[c < low] = -1
    state[c > high] = 1
    steps = torch.arange(c.shape[0]).unsqueeze(-1).expand_as(state)
    last_core = torch.where(state != 0, steps, torch.zeros_like(steps)).cummax(dim=0).values
    filled = state.gather(0, last_core)  # the basin each chain was last seen in (0: none yet)
    switched = (filled[1:] != filled[:-1]) & (filled[:-1] != 0)
    return switched.sum(0)


def grid_2d(xlim: tuple[float, float], ylim: tuple[float, float], grid: int) -> tuple[Tensor, Tensor, Tensor, float]:
    r"""Cell centres of a ``grid × grid`` partition of ``xlim × ylim``, for 2-D quadrature.

    Returns ``(xs (grid,), ys (grid,), points (grid, grid, 2), cell_area)`` in float64 with
    ``points[j, i] = (xs[i], ys[j])`` (rows are y, as images are), so that
    ∫ f ≈ cell_area · Σ f(points).
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    (x0, x1), (y0, y1) = xlim, ylim
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"need xlim and ylim increasing, got {xlim}, {ylim}")
    dx, dy = (x1 - x0) / grid, (y1 - y0) / grid
    xs = x0 + dx * (torch.arange(grid, dtype=torch.float64) + 0.5)
    ys = y0 + dy * (torch.arange(grid, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return xs, ys, torch.stack([xx, yy], dim=-1), dx * dy
