r"""Target energies of the course: p(x) ∝ exp(-E(x) / kT).

Every energy takes ``x`` of shape ``(..., dim)`` (any leading batch shape), in float32 or
float64, on any device, and returns ``E(x)`` of shape ``(...)``. ``energy_and_forces``
also returns the forces ``F(x) = -∇E(x)`` of shape ``(..., dim)``, analytic for every
target here (autograd is only used by the tests, to check them).

Particle systems store ``n_particles`` particles in ``spatial_dim`` dimensions flattened
as ``x[..., i * spatial_dim + a]``; their energies are translation invariant and their
samples live in the centre-of-mass-free subspace (see :func:`remove_com`).

Targets and their conventions (see COURSE.md; these are the literature's benchmarks):

==================  ===================================================================
``DoubleWell2D``    E = x1^4 - 6 x1^2 + x1 + 0.5 x2^2, kT = 1
``MullerBrown``     E = sum_k A_k exp(a_k dx^2 + b_k dx dy + c_k dy^2), kT = 10 by default
``GaussianMixture`` GMM-40: torch.manual_seed(0); means = (rand(40, 2) - 0.5) * 80, equal
                    weights, isotropic std softplus(1); E = -log p (normalised), kT = 1
``ManyWell``        32-D: 16 blocks of x1^4 - 6 x1^2 - 0.5 x1 + 0.5 x2^2, kT = 1
``PairPotential``   DW-4: sum_{i<j} 0.9 (d - 4)^4 - 4 (d - 4)^2, kT = 1
                    LJ-n benchmark: sum over ORDERED pairs i != j of d^-12 - 2 d^-6
                    + 0.5 sum_i |x_i - mean(x)|^2, kT = 1 (= twice the unique-pair sum,
                    i.e. standard LJ at reduced temperature 0.5)
                    standard LJ: sum over unique pairs of eps [(r_m/d)^12 - 2 (r_m/d)^6]
==================  ===================================================================

Bad input raises :class:`EnergyInputError` (a ``ValueError``) naming the problem: a last
dimension that is not ``dim``, a non-floating dtype, NaN or infinite coordinates.
Particles on top of each other give a documented finite value instead (see
``PairPotential``), because samplers legitimately propose such points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from boltzlab.validation import check_points


class EnergyInputError(ValueError):
    """Raised for inputs an energy cannot evaluate: wrong shape, dtype, NaN or inf."""


def remove_com(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Project ``x`` of shape ``(..., n_particles * spatial_dim)`` onto the centre-of-mass-free
    subspace: x_i <- x_i - (1/n) sum_j x_j. Returns the same shape."""
    r = x.reshape(*x.shape[:-1], n_particles, spatial_dim)
    return (r - r.mean(dim=-2, keepdim=True)).reshape(x.shape)


@dataclass(frozen=True)
class Energy:
    """Base class. Subclasses implement ``_energy_and_forces(x) -> (E, F)`` on checked input."""

    name: str
    dim: int
    kT: float = 1.0

    # --- particle structure (None for plain vectors) ---
    @property
    def n_particles(self) -> int | None:
        return None

    @property
    def spatial_dim(self) -> int | None:
        return None

    @property
    def is_particle_system(self) -> bool:
        return self.n_particles is not None

    # --- public API ---
    def check_input(self, x: Tensor) -> Tensor:
        """Validate ``x``: a floating tensor of shape ``(..., dim)`` with finite entries."""
        hint = (f" (flatten particles as (..., {self.n_particles}*{self.spatial_dim}))"
                if self.is_particle_system else "")
        check_points(x, self.dim, self.name, EnergyInputError, hint=hint)
        if not bool(torch.isfinite(x).all()):
            n_bad = int((~torch.isfinite(x)).any(dim=-1).sum()) if x.ndim > 1 else 1
            raise EnergyInputError(
                f"{self.name}: input contains NaN or infinite coordinates ({n_bad} configuration(s))"
            )
        return x

    def energy(self, x: Tensor) -> Tensor:
        """E(x): ``(..., dim) -> (...)``."""
        return self._energy_and_forces(self.check_input(x), want_forces=False)[0]

    def energy_and_forces(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(E(x), -∇E(x)): ``(..., dim) -> ((...), (..., dim))``."""
        e, f = self._energy_and_forces(self.check_input(x), want_forces=True)
        assert f is not None
        return e, f

    def forces(self, x: Tensor) -> Tensor:
        """-∇E(x): ``(..., dim) -> (..., dim)``."""
        return self.energy_and_forces(x)[1]

    def log_prob(self, x: Tensor) -> Tensor:
        """Unnormalised log density -E(x)/kT: ``(..., dim) -> (...)``."""
        return -self.energy(x) / self.kT

    def score(self, x: Tensor) -> Tensor:
        """∇ log p(x) = F(x)/kT: ``(..., dim) -> (..., dim)``."""
        return self.forces(x) / self.kT

    def at_temperature(self, kT: float) -> "Energy":
        """The same energy at another temperature (p ∝ exp(-E/kT))."""
        if not (kT > 0 and math.isfinite(kT)):
            raise ValueError(f"kT must be a positive finite number, got {kT}")
        return replace(self, kT=float(kT))

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------
# 2-D and vector targets
# ----------------------------------------------------------------------------------------


def _log_z_1d(neg_energy: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, n: int = 400_001) -> float:
    """log ∫ exp(neg_energy(u)) du on [lo, hi] by the composite Simpson rule in float64."""
    u = np.linspace(lo, hi, n)
    v = neg_energy(u)
    m = v.max()
    w = np.ones(n)
    w[1:-1:2] = 4.0
    w[2:-1:2] = 2.0
    h = (hi - lo) / (n - 1)
    return float(m + np.log(h / 3.0 * np.sum(w * np.exp(v - m))))


@dataclass(frozen=True)
class DoubleWell2D(Energy):
    """E(x) = x1^4 - 6 x1^2 + x1 + 0.5 x2^2 (the Boltzmann-generators double well).

    The deep well is at x1 < 0. At kT = 1 it holds 0.967 of the mass; the free-energy
    difference between the wells is about 3.38 kT (see :meth:`well_free_energy_difference`).
    """

    name: str = "double_well_2d"
    dim: int = 2
    kT: float = 1.0

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        x1, x2 = x[..., 0], x[..., 1]
        e = x1**4 - 6 * x1**2 + x1 + 0.5 * x2**2
        if not want_forces:
            return e, None
        f = torch.stack([-(4 * x1**3 - 12 * x1 + 1), -x2], dim=-1)
        return e, f

    def _neg_e1(self, u: np.ndarray) -> np.ndarray:
        return -(u**4 - 6 * u**2 + u) / self.kT

    def log_z(self) -> float:
        """Exact log Z = log ∫ exp(-E/kT) dx (x1 by quadrature, x2 Gaussian)."""
        return _log_z_1d(self._neg_e1, -8.0, 8.0) + 0.5 * math.log(2 * math.pi * self.kT)

    def well_probabilities(self) -> tuple[float, float]:
        """Exact (P(x1 < 0), P(x1 > 0)), by quadrature."""
        left = _log_z_1d(self._neg_e1, -8.0, 0.0)
        right = _log_z_1d(self._neg_e1, 0.0, 8.0)
        p_left = 1.0 / (1.0 + math.exp(right - left))
        return p_left, 1.0 - p_left

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               grid: int = 200_001) -> Tensor:
        r"""Exact independent samples, shape ``(n, 2)``.

        p factorises: x2 ~ N(0, kT), and x1 is drawn by inverting its CDF. The density
        exp(-(x1^4 - 6 x1^2 + x1)/kT) is tabulated on ``grid`` points of [-L, L] with
        L = 3 + (50 kT)^{1/4} (beyond it the density is below e^-50 of its maximum), the
        CDF is the cumulative trapezoid rule, and u ~ U(0, 1) maps to x1 = F^{-1}(u) by
        linear interpolation. Float64 throughout; ``dtype`` of the output.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if grid < 1001:
            raise ValueError(f"grid must have at least 1001 points for an accurate inverse CDF, got {grid}")
        half_width = 3.0 + (50.0 * self.kT) ** 0.25
        u_grid = np.linspace(-half_width, half_width, grid)
        log_p = self._neg_e1(u_grid)
        p = np.exp(log_p - log_p.max())
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(u_grid))])
        cdf /= cdf[-1]
        u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        x1 = np.interp(u, cdf, u_grid)
        x2 = math.sqrt(self.kT) * torch.randn(n, generator=generator, dtype=torch.float64).numpy()
        return torch.from_numpy(np.stack([x1, x2], axis=1)).to(dtype)

    def well_free_energy_difference(self) -> float:
        """ΔF / kT = F_right - F_left = -log(P_right / P_left) (positive: right well is less likely)."""
        p_left, p_right = self.well_probabilities()
        return -math.log(p_right / p_left)


_MB_A = (-200.0, -100.0, -170.0, 15.0)
_MB_a = (-1.0, -1.0, -6.5, 0.7)
_MB_b = (0.0, 0.0, 11.0, 0.6)
_MB_c = (-10.0, -10.0, -6.5, 0.7)
_MB_x0 = (1.0, 0.0, -0.5, -1.0)
_MB_y0 = (0.0, 0.5, 1.5, 1.0)


@dataclass(frozen=True)
class MullerBrown(Energy):
    """Müller-Brown potential, E = sum_k A_k exp(a_k dx_k^2 + b_k dx_k dy_k + c_k dy_k^2),
    with dx_k = x - x0_k, dy_k = y - y0_k and the standard parameters. Its three minima are
    at about (-0.558, 1.442) E = -146.70, (0.623, 0.028) E = -108.17, (-0.050, 0.467) E = -80.77.
    Default kT = 10."""

    name: str = "muller_brown"
    dim: int = 2
    kT: float = 10.0

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        p = {k: x.new_tensor(v) for k, v in
             dict(A=_MB_A, a=_MB_a, b=_MB_b, c=_MB_c, x0=_MB_x0, y0=_MB_y0).items()}
        dx = x[..., 0:1] - p["x0"]  # (..., 4)
        dy = x[..., 1:2] - p["y0"]
        terms = p["A"] * torch.exp(p["a"] * dx**2 + p["b"] * dx * dy + p["c"] * dy**2)
        e = terms.sum(-1)
        if not want_forces:
            return e, None
        gx = (terms * (2 * p["a"] * dx + p["b"] * dy)).sum(-1)
        gy = (terms * (p["b"] * dx + 2 * p["c"] * dy)).sum(-1)
        return e, -torch.stack([gx, gy], dim=-1)


def gmm40_means(n_modes: int = 40, scale: float = 80.0) -> Tensor:
    """The GMM-40 means, shape ``(40, 2)``, float32: torch.manual_seed(0) then
    (rand(40, 2) - 0.5) * 80, drawn from a private generator so the global RNG is untouched."""
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n_modes, 2, generator=g) - 0.5) * scale


@dataclass(frozen=True, eq=False)
class GaussianMixture(Energy):
    """Equal-weight isotropic Gaussian mixture: p(x) = (1/M) sum_m N(x; mu_m, s^2 I).

    E(x) = -log p(x), normalised, so log Z = 0 at kT = 1. The default is GMM-40:
    means from :func:`gmm40_means`, s = softplus(1) ≈ 1.3133. Exact samples: :meth:`sample`.
    Forces: -∇E = sum_m r_m(x) (mu_m - x) / s^2 with responsibilities r_m.
    """

    name: str = "gmm40"
    dim: int = 2
    kT: float = 1.0
    means: Tensor = field(default_factory=gmm40_means)
    std: float = float(F.softplus(torch.tensor(1.0)))

    @property
    def n_modes(self) -> int:
        return int(self.means.shape[0])

    def _log_components(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu = self.means.to(dtype=x.dtype, device=x.device)
        diff = mu - x[..., None, :]  # (..., M, d)
        s2 = self.std**2
        logc = -0.5 * (diff**2).sum(-1) / s2 - 0.5 * self.dim * math.log(2 * math.pi * s2) - math.log(self.n_modes)
        return logc, diff

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        logc, diff = self._log_components(x)
        logp = torch.logsumexp(logc, dim=-1)
        if not want_forces:
            return -logp, None
        resp = torch.softmax(logc, dim=-1)
        return -logp, (resp[..., None] * diff).sum(-2) / self.std**2

    def log_z(self) -> float:
        """log ∫ exp(-E/kT) dx; exact (0) at kT = 1 only."""
        if self.kT != 1.0:
            raise ValueError("the mixture's log Z is known in closed form only at kT = 1")
        return 0.0

    def sample(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact samples at kT = 1, shape ``(n, dim)``."""
        if self.kT != 1.0:
            raise ValueError("exact sampling is implemented at kT = 1 only")
        idx = torch.randint(self.n_modes, (n,), generator=generator)
        eps = torch.randn(n, self.dim, generator=generator)
        return (self.means[idx] + self.std * eps).to(dtype)

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index of the nearest mean for each point: ``(..., dim) -> (...)`` long."""
        mu = self.means.to(dtype=x.dtype, device=x.device)
        return torch.cdist(x.reshape(-1, self.dim), mu).argmin(-1).reshape(x.shape[:-1])


@dataclass(frozen=True)
class ManyWell(Energy):
    """Many-well: ``n_blocks`` independent 2-D double wells,
    E(x) = sum_b [x_{2b}^4 - 6 x_{2b}^2 - 0.5 x_{2b} + 0.5 x_{2b+1}^2] (32-D by default).
    It has 2^n_blocks modes and an exact log Z (product of 1-D integrals)."""

    name: str = "many_well_32"
    dim: int = 32
    kT: float = 1.0

    def __post_init__(self) -> None:
        if self.dim % 2:
            raise ValueError(f"ManyWell needs an even dimension, got {self.dim}")

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        u, v = x[..., 0::2], x[..., 1::2]
        e = (u**4 - 6 * u**2 - 0.5 * u + 0.5 * v**2).sum(-1)
        if not want_forces:
            return e, None
        f = torch.empty_like(x)
        f[..., 0::2] = -(4 * u**3 - 12 * u - 0.5)
        f[..., 1::2] = -v
        return e, f

    def log_z(self) -> float:
        """Exact log Z = n_blocks * (log ∫ exp(-(u^4 - 6u^2 - 0.5u)/kT) du + 0.5 log(2π kT))."""
        one = _log_z_1d(lambda u: -(u**4 - 6 * u**2 - 0.5 * u) / self.kT, -8.0, 8.0)
        return (self.dim // 2) * (one + 0.5 * math.log(2 * math.pi * self.kT))


# ----------------------------------------------------------------------------------------
# Particle systems
# ----------------------------------------------------------------------------------------

PAIR_MIN_DISTANCE = 1e-2
"""Pair distances below this are clamped to it in pair potentials. For Lennard-Jones this
makes coincident particles give a huge but finite energy (about 1e24 per pair) instead of
inf/NaN; the pair force is then evaluated at the clamped distance along r_ij (and is zero
when two particles coincide exactly, where no direction exists)."""


@dataclass(frozen=True)
class PairPotential(Energy):
    """E(x) = c_pair * sum_{i<j} u(d_ij) + 0.5 * k_harm * sum_i |x_i - mean(x)|^2.

    ``kind`` selects u: ``"lj"`` gives eps [(r_m/d)^12 - 2 (r_m/d)^6]; ``"dw"`` gives
    a (d - d0)^4 + b (d - d0)^2. ``ordered_pairs=True`` sums over ordered pairs i != j
    (c_pair = 2), as the LJ benchmark does. Use the factories :func:`dw4`, :func:`lj13`,
    :func:`lj55`, :func:`lj_benchmark` and :func:`lj_standard`.

    Forces: F_i = -sum_j c_pair u'(d_ij) (x_i - x_j)/d_ij - k_harm (x_i - mean(x)).
    Overlapping particles: see :data:`PAIR_MIN_DISTANCE`.
    """

    name: str = "pair"
    dim: int = 0
    kT: float = 1.0
    n: int = 0
    d_space: int = 3
    kind: str = "lj"
    ordered_pairs: bool = False
    harmonic: float = 0.0
    eps: float = 1.0
    r_m: float = 1.0
    dw_a: float = 0.9
    dw_b: float = -4.0
    dw_d0: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("lj", "dw"):
            raise ValueError(f"unknown pair potential kind {self.kind!r}; use 'lj' or 'dw'")
        if self.n < 2 or self.dim != self.n * self.d_space:
            raise ValueError(f"need n >= 2 and dim = n * d_space, got n={self.n}, dim={self.dim}")

    @property
    def n_particles(self) -> int:
        return self.n

    @property
    def spatial_dim(self) -> int:
        return self.d_space

    @property
    def pair_factor(self) -> float:
        return 2.0 if self.ordered_pairs else 1.0

    def pair_energy(self, d: Tensor) -> Tensor:
        """u(d) elementwise."""
        if self.kind == "lj":
            s6 = (self.r_m / d) ** 6
            return self.eps * (s6 * s6 - 2 * s6)
        t = d - self.dw_d0
        return self.dw_a * t**4 + self.dw_b * t**2

    def pair_derivative(self, d: Tensor) -> Tensor:
        """u'(d) elementwise."""
        if self.kind == "lj":
            s6 = (self.r_m / d) ** 6
            return self.eps * 12 * (s6 - s6 * s6) / d
        t = d - self.dw_d0
        return 4 * self.dw_a * t**3 + 2 * self.dw_b * t

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        batch = x.shape[:-1]
        r = x.reshape(-1, self.n, self.d_space)
        i, j = torch.triu_indices(self.n, self.n, 1, device=x.device)
        rij = r[:, i] - r[:, j]  # (B, P, d)
        d_raw = rij.norm(dim=-1)
        d = d_raw.clamp_min(PAIR_MIN_DISTANCE)
        e = self.pair_factor * self.pair_energy(d).sum(-1)
        centred = r - r.mean(dim=1, keepdim=True)
        if self.harmonic:
            e = e + 0.5 * self.harmonic * (centred**2).sum((-1, -2))
        if not want_forces:
            return e.reshape(batch), None
        # unit vectors; exactly coincident particles get a zero direction
        unit = rij / d_raw.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
        fij = -(self.pair_factor * self.pair_derivative(d)).unsqueeze(-1) * unit  # force on i from j
        f = torch.zeros_like(r)
        f.index_add_(1, i, fij)
        f.index_add_(1, j, -fij)
        if self.harmonic:
            f = f - self.harmonic * centred
        return e.reshape(batch), f.reshape(*batch, self.dim)

    def remove_com(self, x: Tensor) -> Tensor:
        """Project onto the centre-of-mass-free subspace (same shape)."""
        return remove_com(x, self.n, self.d_space)

    @property
    def effective_dim(self) -> int:
        """Degrees of freedom in the centre-of-mass-free subspace: (n - 1) * d_space."""
        return (self.n - 1) * self.d_space

    def pair_distances(self, x: Tensor) -> Tensor:
        """Unique pair distances: ``(..., dim) -> (..., n(n-1)/2)``."""
        x = self.check_input(x)
        r = x.reshape(*x.shape[:-1], self.n, self.d_space)
        i, j = torch.triu_indices(self.n, self.n, 1, device=x.device)
        return (r[..., i, :] - r[..., j, :]).norm(dim=-1)


def dw4(kT: float = 1.0) -> PairPotential:
    """DW-4: 4 particles in 2-D, E = sum_{i<j} 0.9 (d - 4)^4 - 4 (d - 4)^2, kT = 1."""
    return PairPotential(name="dw4", dim=8, kT=kT, n=4, d_space=2, kind="dw")


def lj_benchmark(n: int, kT: float = 1.0) -> PairPotential:
    """LJ-n as the literature benchmarks it: sum over ORDERED pairs of d^-12 - 2 d^-6 plus
    0.5 sum_i |x_i - mean|^2, at kT = 1 (standard LJ at reduced temperature 0.5)."""
    return PairPotential(name=f"lj{n}", dim=3 * n, kT=kT, n=n, d_space=3, kind="lj",
                         ordered_pairs=True, harmonic=1.0)


def lj13(kT: float = 1.0) -> PairPotential:
    """LJ-13 benchmark energy (see :func:`lj_benchmark`)."""
    return lj_benchmark(13, kT)


def lj55(kT: float = 1.0) -> PairPotential:
    """LJ-55 benchmark energy (see :func:`lj_benchmark`)."""
    return lj_benchmark(55, kT)


def lj_standard(n: int, kT: float = 1.0, eps: float = 1.0, r_m: float = 1.0, harmonic: float = 0.0) -> PairPotential:
    """Standard Lennard-Jones over UNIQUE pairs, eps [(r_m/d)^12 - 2 (r_m/d)^6]
    (= 4 eps [(s/d)^12 - (s/d)^6] with s = r_m 2^(-1/6)), optionally tethered."""
    return PairPotential(name=f"lj{n}_standard", dim=3 * n, kT=kT, n=n, d_space=3, kind="lj",
                         ordered_pairs=False, harmonic=harmonic, eps=eps, r_m=r_m)


TARGETS: dict[str, Callable[[], Energy]] = {
    "double_well": DoubleWell2D,
    "muller_brown": MullerBrown,
    "gmm40": GaussianMixture,
    "many_well": ManyWell,
    "dw4": dw4,
    "lj13": lj13,
    "lj55": lj55,
}


def get_target(name: str) -> Energy:
    """Look a target up by name (one of :data:`TARGETS`)."""
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]()
