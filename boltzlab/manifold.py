r"""Sample complexity and the manifold hypothesis (chapter 01).

How many samples a density estimate needs as the dimension grows, and how many dimensions
configurations of a particle system really fill.

=================================  ======================================================
:func:`silverman_bandwidth`        the Gaussian-kernel bandwidth that minimises the
                                   asymptotic mean integrated squared error for Gaussian data
:func:`kde_log_density`            log of a Gaussian kernel density estimate at query points
:func:`gaussian_kde_mse`           its mean squared log-density error on a standard Gaussian
:func:`power_law_fit`              y ≈ c x^b by least squares in log-log: the exponent b
:func:`twonn_dimension`            intrinsic dimension from the ratio of the two nearest-
                                   neighbour distances (TwoNN, Facco et al., Sci. Rep. 2017)
:func:`twonn_by_scale`             TwoNN on disjoint subsets of several sizes (coarser scales)
:func:`pca_spectrum`               eigenvalues of the sample covariance, largest first
:func:`rigid_motion_dof`           degrees of freedom removed by translations and rotations
:func:`distance_jacobian_rank`     rank of d(pair distances)/dx at a configuration: the
                                   internal degrees of freedom, measured
:func:`sorted_pair_distances`      pair distances sorted per configuration (invariant to
                                   translations, rotations, reflections and permutations)
:class:`StiffBond`                 a molecule-like toy with exact samples and density: one
                                   stiff bond (length r ~ 1 ± sqrt(kT/k_bond)) and one soft
                                   bond angle, so its samples lie near a 1-D arc in 2-D
=================================  ======================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ManifoldInputError",
    "StiffBond",
    "distance_jacobian_rank",
    "gaussian_kde_mse",
    "kde_log_density",
    "pca_spectrum",
    "power_law_fit",
    "rigid_motion_dof",
    "silverman_bandwidth",
    "sorted_pair_distances",
    "twonn_by_scale",
    "twonn_dimension",
]

LOG_2PI = math.log(2 * math.pi)


class ManifoldInputError(ValueError):
    """Raised for inputs these estimators cannot use: wrong shape, too few points, NaN."""


def _points(x: object, name: str, min_rows: int = 1) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ManifoldInputError(f"{name} must be a floating tensor of shape (n, dim), got {got}")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ManifoldInputError(f"{name} needs at least {min_rows} rows and one column, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ManifoldInputError(f"{name} contains NaN or infinite values")
    return x


def silverman_bandwidth(samples: Tensor) -> float:
    r"""Bandwidth h of an isotropic Gaussian kernel for ``samples`` ``(n, d)``:

        h = σ̄ (4 / ((d + 2) n))^{1/(d+4)},   σ̄ = mean over coordinates of the sample std.

    For Gaussian data with covariance σ̄² I this is the h that minimises the asymptotic mean
    integrated squared error of the estimate (Silverman, *Density Estimation*, 1986, eq.
    4.14); the error then falls as n^{-4/(d+4)}.
    """
    x = _points(samples, "samples", min_rows=2)
    n, d = x.shape
    sigma = float(x.double().std(0).mean())
    if sigma <= 0:
        raise ManifoldInputError("samples have zero spread: no bandwidth can be chosen")
    return sigma * (4.0 / ((d + 2) * n)) ** (1.0 / (d + 4))


def kde_log_density(query: Tensor, samples: Tensor, bandwidth: float | None = None, chunk: int = 1024) -> Tensor:
    r"""Log of the Gaussian kernel density estimate built on ``samples`` ``(n, d)``, at
    ``query`` ``(m, d)``:

        log p̂(y) = logsumexp_i [ -|y - x_i|² / (2h²) ] - log n - (d/2) log(2π h²),

    in float64, ``(m,)``. ``bandwidth`` h defaults to :func:`silverman_bandwidth`; ``chunk``
    query points are processed at a time (memory ``chunk * n``).
    """
    x = _points(samples, "samples").double()
    y = _points(query, "query").double()
    if y.shape[1] != x.shape[1]:
        raise ManifoldInputError(f"query has dimension {y.shape[1]} but samples have {x.shape[1]}")
    h = silverman_bandwidth(x) if bandwidth is None else float(bandwidth)
    if not (h > 0 and math.isfinite(h)):
        raise ManifoldInputError(f"bandwidth must be positive and finite, got {bandwidth!r}")
    n, d = x.shape
    const = -math.log(n) - 0.5 * d * (LOG_2PI + 2 * math.log(h))
    out = [torch.logsumexp(-torch.cdist(y[s : s + chunk], x).square() / (2 * h * h), dim=1)
           for s in range(0, y.shape[0], max(1, int(chunk)))]
    return torch.cat(out) + const


def gaussian_kde_mse(dim: int, sizes: list[int] | tuple[int, ...], n_query: int, repeats: int = 1,
                     generator: torch.Generator | None = None, statistic: str = "mean") -> Tensor:
    r"""Squared error of the KDE's log-density of the standard Gaussian N(0, I_dim),

        e_n(y) = mean over repeats of ( log p̂_n(y) - log N(y; 0, I) )²,

    for each n in ``sizes`` (samples x ~ N(0, I), Silverman's bandwidth), at ``n_query``
    held-out points y ~ N(0, I) drawn once, with ``repeats`` independent sample sets; then the
    ``statistic`` (``"mean"`` or ``"median"``) of e_n over the points y. Returns float64
    ``(len(sizes),)``. At a fixed y the log error is the relative error of the density, so
    the textbook rate of the KDE's squared error, n^{-4/(4+d)}, applies pointwise; the
    median is not dominated by the few far-tail points, where that asymptotic regime
    starts only at much larger n.
    """
    if statistic not in ("mean", "median"):
        raise ManifoldInputError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ManifoldInputError(f"dim must be a positive int, got {dim!r}")
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in sizes):
        raise ManifoldInputError(f"sizes must be ints >= 2, got {sizes!r}")
    if n_query < 1 or repeats < 1:
        raise ManifoldInputError(f"n_query and repeats must be positive, got {n_query}, {repeats}")
    y = torch.randn(n_query, dim, generator=generator, dtype=torch.float64)
    exact = -0.5 * (y**2).sum(1) - 0.5 * dim * LOG_2PI
    out = torch.zeros(len(sizes), dtype=torch.float64)
    for k, n in enumerate(sizes):
        err = torch.zeros(n_query, dtype=torch.float64)
        for _ in range(repeats):
            x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
            err += (kde_log_density(y, x) - exact) ** 2 / repeats
        out[k] = err.mean() if statistic == "mean" else err.median()
    return out


def power_law_fit(x: Tensor, y: Tensor) -> tuple[float, float]:
    r"""Least-squares fit of log y = log c + b log x: returns (b, log c). ``x``, ``y`` positive,
    ``(k,)`` with k >= 2."""
    x, y = torch.as_tensor(x, dtype=torch.float64).reshape(-1), torch.as_tensor(y, dtype=torch.float64).reshape(-1)
    if x.numel() != y.numel() or x.numel() < 2 or not bool((x > 0).all() and (y > 0).all()):
        raise ManifoldInputError("power_law_fit needs two positive 1-D tensors of the same length >= 2")
    design = torch.stack([x.log(), torch.ones_like(x)], 1)
    b, log_c = torch.linalg.lstsq(design, y.log()[:, None]).solution[:, 0].tolist()
    return b, log_c


def _two_nearest(x: Tensor, chunk: int = 1024) -> Tensor:
    """Distances to the first and second nearest other point, ``(n, 2)``."""
    n = x.shape[0]
    rows = []
    for s in range(0, n, chunk):
        # the matrix-product shortcut loses the small distances TwoNN divides by
        dist = torch.cdist(x[s : s + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")
        idx = torch.arange(s, min(s + chunk, n))
        dist[idx - s, idx] = math.inf  # a point is not its own neighbour
        rows.append(dist.topk(2, dim=1, largest=False).values)
    return torch.cat(rows)


def twonn_dimension(x: Tensor, discard_fraction: float = 0.1) -> float:
    r"""Intrinsic dimension of the points ``x`` ``(n, D)`` by TwoNN (Facco, d'Errico, Rodriguez
    and Laio, Sci. Rep. 7, 12140, 2017).

    For each point, μ = r₂ / r₁ with r₁, r₂ the distances to its two nearest neighbours.
    Where the density is roughly constant over the scale r₂, μ follows the Pareto law
    F(μ) = 1 - μ^{-d} whatever the density, with d the dimension of the set the points fill.
    So -log(1 - F(μ)) = d log μ, a line through the origin: d is its least-squares slope,
    fitted on the empirical F after dropping the largest ``discard_fraction`` of the μ
    (they come from points in sparse regions, where the assumption fails).

    The estimate describes the data at the scale of the nearest-neighbour distances:
    subsample (fewer points, larger distances) to look at coarser scales. Needs n >= 8
    points, no duplicates.
    """
    x = _points(x, "x", min_rows=8).double()
    if not 0.0 <= discard_fraction < 1.0:
        raise ManifoldInputError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    r = _two_nearest(x)
    if bool((r[:, 0] <= 0).any()):
        raise ManifoldInputError(f"x has {int((r[:, 0] <= 0).sum())} duplicated points (nearest distance 0)")
    mu = torch.sort(r[:, 1] / r[:, 0]).values
    n = mu.numel()
    keep = max(2, math.floor(n * (1.0 - discard_fraction)))
    f_emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    lx = mu[:keep].log()
    ly = -torch.log1p(-f_emp[:keep])
    return float((lx * ly).sum() / (lx * lx).sum())


def twonn_by_scale(x: Tensor, sizes: list[int] | tuple[int, ...], generator: torch.Generator | None = None,
                   max_subsets: int = 20) -> Tensor:
    r"""TwoNN dimension of ``x`` ``(n, D)`` seen at coarser scales: for each m in ``sizes``,
    the mean of :func:`twonn_dimension` over up to ``max_subsets`` disjoint random subsets of
    m points. Fewer points are farther apart (distances grow like m^{-1/d}), so a small m
    looks at the data from farther away (Facco et al. call this decimation). Returns float64
    ``(len(sizes),)``.
    """
    x = _points(x, "x", min_rows=8)
    perm = torch.randperm(x.shape[0], generator=generator)
    out = []
    for m in sizes:
        if isinstance(m, bool) or not isinstance(m, int) or not 8 <= m <= x.shape[0]:
            raise ManifoldInputError(f"subset sizes must be ints between 8 and {x.shape[0]}, got {m!r}")
        k = min(max_subsets, x.shape[0] // m)
        out.append(sum(twonn_dimension(x[perm[i * m : (i + 1) * m]]) for i in range(k)) / k)
    return torch.tensor(out, dtype=torch.float64)


def pca_spectrum(x: Tensor) -> Tensor:
    """Eigenvalues of the sample covariance of ``x`` ``(n, D)``, largest first, ``(D,)``
    float64 (clamped at 0: roundoff can make a zero eigenvalue slightly negative)."""
    x = _points(x, "x", min_rows=2).double()
    centred = x - x.mean(0)
    cov = centred.T @ centred / (x.shape[0] - 1)
    return torch.linalg.eigvalsh(cov).flip(0).clamp_min(0.0)


def rigid_motion_dof(n_particles: int, spatial_dim: int) -> int:
    r"""Degrees of freedom of n particles in d dimensions that translations and rotations
    remove: d + d(d - 1)/2 (for a configuration that is not collinear, n > d). The internal
    degrees of freedom are n d minus this: 8 - 3 = 5 for DW-4, 39 - 6 = 33 for LJ-13."""
    for label, v in (("n_particles", n_particles), ("spatial_dim", spatial_dim)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ManifoldInputError(f"{label} must be a positive int, got {v!r}")
    if n_particles <= spatial_dim:
        raise ManifoldInputError(f"need more particles than dimensions, got {n_particles} in {spatial_dim}-D")
    return spatial_dim + spatial_dim * (spatial_dim - 1) // 2


def sorted_pair_distances(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """The n(n-1)/2 pair distances of each configuration, sorted ascending: ``(B, n d) ->
    (B, n(n-1)/2)``. Sorting makes them invariant to permuting identical particles, as the
    distances are to translations, rotations and reflections."""
    x = _points(x, "x")
    if x.shape[1] != n_particles * spatial_dim:
        raise ManifoldInputError(f"x has {x.shape[1]} coordinates, expected {n_particles} * {spatial_dim}")
    r = x.reshape(-1, n_particles, spatial_dim)
    i, j = torch.triu_indices(n_particles, n_particles, 1)
    return torch.sort((r[:, i] - r[:, j]).norm(dim=-1), dim=1).values


def distance_jacobian_rank(x: Tensor, n_particles: int, spatial_dim: int, rtol: float = 1e-8) -> tuple[int, Tensor]:
    r"""Rank of the Jacobian J = ∂d/∂x of the pair distances d (``n(n-1)/2``) with respect to
    the coordinates x (``n d``) at one configuration ``x`` ``(n d,)``, and J's singular values
    (float64, largest first).

    Distances are unchanged by translations and rotations, so those directions are in J's
    null space; for a generic configuration nothing else is, and the rank is the number of
    internal degrees of freedom, n d - :func:`rigid_motion_dof`. A singular value counts
    when it exceeds ``rtol`` times the largest.
    """
    if not isinstance(x, Tensor) or x.ndim != 1 or x.numel() != n_particles * spatial_dim:
        raise ManifoldInputError(f"x must be one configuration of shape ({n_particles * spatial_dim},)")
    i, j = torch.triu_indices(n_particles, n_particles, 1)

    def distances(flat: Tensor) -> Tensor:
        r = flat.reshape(n_particles, spatial_dim)
        return (r[i] - r[j]).norm(dim=-1)

    jac = torch.autograd.functional.jacobian(distances, x.detach().double())
    sv = torch.linalg.svdvals(jac)
    return int((sv > rtol * sv[0]).sum()), sv


@dataclass(frozen=True)
class StiffBond:
    r"""A molecule-like toy in 2-D: an atom at x = r (cos θ, sin θ) bonded to a fixed atom at
    the origin, with a stiff bond and a soft bond angle,

        E(x) = k_bond/2 (r - 1)² + k_angle/2 θ²,   θ ∈ (-π, π],

    at temperature kT. The density in Cartesian coordinates is
    p(x) = exp(-E/kT) / Z with Z = Z_r Z_θ, Z_r = ∫₀^∞ r e^{-k_bond (r-1)²/(2kT)} dr (the r is
    the polar Jacobian) and Z_θ = ∫ e^{-k_angle θ²/(2kT)} dθ over (-π, π]. Its samples lie
    within about the bond's thermal width σ = sqrt(kT / k_bond) of a 1-D arc of the unit
    circle: as k_bond grows the distribution approaches a density on a curve, and
    E_p[log p] grows like -log σ without bound.
    """

    k_bond: float = 100.0
    k_angle: float = 1.0
    kT: float = 1.0

    def __post_init__(self) -> None:
        for label in ("k_bond", "k_angle", "kT"):
            v = getattr(self, label)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ManifoldInputError(f"{label} must be a positive finite number, got {v!r}")

    @property
    def thickness(self) -> float:
        """σ = sqrt(kT / k_bond), the thermal width of the bond length."""
        return math.sqrt(self.kT / self.k_bond)

    def _r_grid(self) -> Tensor:
        s = self.thickness
        return torch.linspace(max(1e-9, 1 - 12 * s), 1 + 12 * s, 20_001, dtype=torch.float64)

    def _theta_grid(self) -> Tensor:
        return torch.linspace(-math.pi, math.pi, 20_001, dtype=torch.float64)

    def _log_z_parts(self) -> tuple[float, float]:
        r, t = self._r_grid(), self._theta_grid()
        z_r = torch.trapezoid(r * torch.exp(-self.k_bond * (r - 1) ** 2 / (2 * self.kT)), r)
        z_t = torch.trapezoid(torch.exp(-self.k_angle * t**2 / (2 * self.kT)), t)
        return float(z_r.log()), float(z_t.log())

    def log_z(self) -> float:
        """log Z by quadrature (float64)."""
        a, b = self._log_z_parts()
        return a + b

    def energy(self, x: Tensor) -> Tensor:
        """E(x): ``(n, 2) -> (n,)``."""
        x = _points(x, "x").double()
        if x.shape[1] != 2:
            raise ManifoldInputError(f"StiffBond lives in 2-D, got points of dimension {x.shape[1]}")
        r = x.norm(dim=1)
        theta = torch.atan2(x[:, 1], x[:, 0])
        return 0.5 * self.k_bond * (r - 1) ** 2 + 0.5 * self.k_angle * theta**2

    def log_prob(self, x: Tensor) -> Tensor:
        """Normalised log p(x) = -E(x)/kT - log Z: ``(n, 2) -> (n,)``."""
        return -self.energy(x) / self.kT - self.log_z()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples ``(n, 2)`` float64: r and θ are independent, each drawn by inverting
        its CDF on a fine grid (linear interpolation)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ManifoldInputError(f"n must be a positive int, got {n!r}")
        r_grid, t_grid = self._r_grid(), self._theta_grid()
        r = _inverse_cdf(r_grid, r_grid * torch.exp(-self.k_bond * (r_grid - 1) ** 2 / (2 * self.kT)), n, generator)
        t = _inverse_cdf(t_grid, torch.exp(-self.k_angle * t_grid**2 / (2 * self.kT)), n, generator)
        return torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1)


def _inverse_cdf(grid: Tensor, density: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    cdf = torch.cat([density.new_zeros(1), torch.cumsum(0.5 * (density[1:] + density[:-1]) * grid.diff(), 0)])
    cdf = cdf / cdf[-1]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    k = torch.searchsorted(cdf, u).clamp(1, grid.numel() - 1)
    frac = (u - cdf[k - 1]) / (cdf[k] - cdf[k - 1]).clamp_min(1e-300)
    return grid[k - 1] + frac * (grid[k] - grid[k - 1])
