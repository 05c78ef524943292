r"""The numbers a pair-potential kernel needs, taken from a :class:`~boltzlab.energies.PairPotential`.

Every path (dense reference, chunked CPU path, Triton kernels) evaluates

    E(x) = c * sum_{i<j} u(d_ij) + 0.5 * k * sum_i |x_i - mean(x)|^2
    F_i  = sum_{j != i} g_ij (x_i - x_j) - k (x_i - mean(x)),   g_ij = -c u'(d_ij) / d_ij

with the conventions of :mod:`boltzlab.energies`: ``c`` is the pair factor (2 for ordered
pairs), distances are clamped at ``PAIR_MIN_DISTANCE`` (``d = max(d_raw, d_min)``) and a
clamped pair pushes along ``x_i - x_j`` with the force at ``d_min``:
``g_ij = -c u'(d_min) / d_raw``. Two particles exactly on top of each other feel no pair
force (there is no direction), as in ``energies.py``.

One deviation, so that float32 never overflows: ``d_raw`` in that last formula is floored at
:attr:`PairParams.tiny_distance` (about 7e-8 for float32 LJ, about 1e-292 for float64), below
which the force of a clamped pair shrinks linearly to zero instead of staying at its
``d_min`` magnitude. Only pairs closer than that are affected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzlab.energies import PAIR_MIN_DISTANCE, PairPotential

PARAM_NAMES: tuple[str, ...] = (
    "pair_factor", "eps", "r_m_sq", "harmonic", "d_min_sq", "tiny_r2", "clamp_coef",
    "dw_a", "dw_b", "dw_d0", "kT",
)
"""Order of the entries of :meth:`PairParams.as_tensor` (the kernels index it by position)."""

# Margin below the dtype's largest number that |g_ij| may reach, so sums of a few
# thousand pair terms stay finite.
_OVERFLOW_MARGIN = 1e4


@dataclass(frozen=True)
class PairParams:
    """Scalar parameters of a pair potential, in the form the kernels use.

    Shapes and meaning: all fields are Python scalars. ``kind`` is ``"lj"`` or ``"dw"``;
    ``n_particles`` and ``spatial_dim`` give the flattened layout ``x[..., i * spatial_dim + a]``.
    ``clamp_coef`` is ``-c u'(d_min)``, so a clamped pair has ``g_ij = clamp_coef / d_raw``.
    """

    kind: str
    n_particles: int
    spatial_dim: int
    pair_factor: float
    eps: float
    r_m: float
    harmonic: float
    dw_a: float
    dw_b: float
    dw_d0: float
    kT: float
    d_min: float = PAIR_MIN_DISTANCE

    @classmethod
    def from_potential(cls, potential: PairPotential) -> "PairParams":
        """Read the parameters of ``potential`` (a :class:`PairPotential`)."""
        if not isinstance(potential, PairPotential):
            raise TypeError(
                f"the pair kernels need a boltzlab.energies.PairPotential, got {type(potential).__name__}"
            )
        return cls(
            kind=potential.kind, n_particles=potential.n, spatial_dim=potential.d_space,
            pair_factor=potential.pair_factor, eps=potential.eps, r_m=potential.r_m,
            harmonic=potential.harmonic, dw_a=potential.dw_a, dw_b=potential.dw_b,
            dw_d0=potential.dw_d0, kT=potential.kT,
        )

    @property
    def n_pairs(self) -> int:
        """Unique pairs per configuration, n (n - 1) / 2."""
        return self.n_particles * (self.n_particles - 1) // 2

    @property
    def dim(self) -> int:
        return self.n_particles * self.spatial_dim

    def pair_derivative(self, d: float) -> float:
        """u'(d) for one distance, in float64 Python arithmetic."""
        if self.kind == "lj":
            s6 = (self.r_m / d) ** 6
            return self.eps * 12.0 * (s6 - s6 * s6) / d
        t = d - self.dw_d0
        return 4.0 * self.dw_a * t**3 + 2.0 * self.dw_b * t

    @property
    def clamp_coef(self) -> float:
        """-c u'(d_min): the pair coefficient of a clamped pair times d_raw."""
        return -self.pair_factor * self.pair_derivative(self.d_min)

    def tiny_r2(self, dtype: torch.dtype) -> float:
        """Floor on d_raw^2 in the clamped-pair force, so that |clamp_coef| / d_raw stays finite."""
        finfo = torch.finfo(dtype)
        floor_d = abs(self.clamp_coef) * _OVERFLOW_MARGIN / finfo.max
        return max(floor_d * floor_d, finfo.tiny)

    def as_tensor(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """The parameters as a 1-D tensor in the order of :data:`PARAM_NAMES`.

        Passed to kernels as a tensor (not Python floats) so float64 kernels get float64
        constants and the compiled CPU path does not recompile for every potential.
        """
        values = [
            self.pair_factor, self.eps, self.r_m**2, self.harmonic, self.d_min**2,
            self.tiny_r2(dtype), self.clamp_coef,
            self.dw_a, self.dw_b, self.dw_d0, self.kT,
        ]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"pair potential parameters must be finite, got {dict(zip(PARAM_NAMES, values))}")
        return torch.tensor(values, dtype=dtype, device=device)
