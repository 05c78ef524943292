r"""Local energy minimisation and ideal Lennard-Jones cluster geometries.

:func:`minimize_energy` runs L-BFGS (``torch.optim.LBFGS`` with a strong-Wolfe line search)
on a batch of configurations at once. The objective is sum_b E(x_b); since the
configurations do not interact, its gradient with respect to x_b is ∇E(x_b) and its
minima are the per-configuration minima, so one optimiser serves the whole batch. Forces
are analytic (no autograd). Particle systems are minimised in the centre-of-mass-free
subspace.

Geometries: :func:`icosahedron_13` (centre + 12 vertices) and :func:`mackay_icosahedron_55`
(centre, 12 vertices, then 12 vertices at twice the radius and the 30 midpoints of the
edges of that doubled icosahedron), the global minima of LJ-13 and LJ-55 up to relaxation.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzlab.energies import Energy, remove_com

GOLDEN_RATIO = (1 + math.sqrt(5)) / 2


@dataclass
class MinimizationResult:
    """Output of :func:`minimize_energy`.

    Attributes:
        x: minimised configurations, ``(..., dim)`` in the input's shape, float64 unless
            another ``dtype`` was asked for; COM-free for particle systems.
        energy: E(x), ``(...)``.
        max_force: largest |force component| of each configuration, ``(...)``.
        n_evaluations: energy-and-force evaluations of the whole batch.
        converged: whether every configuration reached ``max_force <= force_tolerance``.
    """

    x: Tensor
    energy: Tensor
    max_force: Tensor
    n_evaluations: int
    converged: bool


def _project(energy: Energy, v: Tensor) -> Tensor:
    if energy.is_particle_system:
        return remove_com(v, int(energy.n_particles), int(energy.spatial_dim))  # type: ignore[arg-type]
    return v


def minimize_energy(
    energy: Energy,
    x0: Tensor,
    force_tolerance: float = 1e-5,
    max_evaluations: int = 20_000,
    history_size: int = 50,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> MinimizationResult:
    """Minimise E from ``x0`` ``(..., dim)`` by L-BFGS until every |∂E/∂x_i| <= ``force_tolerance``
    or ``max_evaluations`` batch evaluations are spent.

    Returns a :class:`MinimizationResult` (``x`` keeps ``x0``'s shape). Each configuration
    goes to a nearby local minimum, not necessarily the global one. The line search
    compares energies, so in float64 it stalls once E changes by less than its rounding
    (forces of about 1e-6 for LJ-13); the default tolerance 1e-5 already puts the energy
    within about F²/(2k) ~ 1e-11 of the minimum.
    """
    x0 = energy.check_input(x0)
    if force_tolerance <= 0 or max_evaluations < 1:
        raise ValueError(f"need force_tolerance > 0 and max_evaluations >= 1, got {force_tolerance}, {max_evaluations}")
    shape = x0.shape
    x = torch.nn.Parameter(_project(energy, x0.detach().to(dtype).reshape(-1, energy.dim)).clone())
    optimiser = torch.optim.LBFGS(
        [x], lr=1.0, max_iter=200, max_eval=250, history_size=history_size,
        tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe",
    )
    n_evaluations = 0
    max_force = torch.full(x.shape[:-1], math.inf, dtype=dtype)

    def closure() -> Tensor:
        nonlocal n_evaluations, max_force
        e, f = energy.energy_and_forces(x.detach())
        grad = -_project(energy, f)
        x.grad = grad
        n_evaluations += 1
        max_force = grad.abs().amax(dim=-1)
        return e.sum()

    bar = tqdm(total=max_evaluations, desc=f"L-BFGS {energy.name}", disable=not progress)
    previous = math.inf
    restarted = False
    while n_evaluations < max_evaluations:
        before = n_evaluations
        optimiser.step(closure)
        bar.update(n_evaluations - before)
        loss = float(energy.energy(x.detach()).sum())
        if float(max_force.max()) <= force_tolerance:
            break
        if loss >= previous:
            # a whole L-BFGS round without decrease: the curvature memory may be stale
            # (or we are at machine precision); forget it once, then give up
            if restarted:
                break
            optimiser.state.clear()
            restarted = True
        previous = min(previous, loss)
    bar.close()

    x_min = _project(energy, x.detach())
    e_min, f_min = energy.energy_and_forces(x_min)
    max_force = _project(energy, f_min).abs().amax(dim=-1)
    return MinimizationResult(
        x=x_min.reshape(shape),
        energy=e_min.reshape(shape[:-1]),
        max_force=max_force.reshape(shape[:-1]),
        n_evaluations=n_evaluations,
        converged=bool(max_force.max() <= force_tolerance),
    )


# ----------------------------------------------------------------------------------------
# Ideal cluster geometries
# ----------------------------------------------------------------------------------------


def icosahedron_vertices() -> Tensor:
    """The 12 vertices of a regular icosahedron on the unit sphere, ``(12, 3)`` float64:
    cyclic permutations of (0, ±1, ±φ), φ the golden ratio, divided by sqrt(1 + φ²)."""
    rows = []
    for s1, s2 in itertools.product((-1.0, 1.0), repeat=2):
        a, b = s1, s2 * GOLDEN_RATIO
        rows += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    v = torch.tensor(rows, dtype=torch.float64)
    return v / math.sqrt(1 + GOLDEN_RATIO**2)


def icosahedron_edges() -> list[tuple[int, int]]:
    """The 30 edges (i, j), i < j, of :func:`icosahedron_vertices`: the pairs at the shortest distance."""
    v = icosahedron_vertices()
    d = torch.cdist(v, v)
    edge = d[d > 1e-9].min()
    return [(i, j) for i in range(12) for j in range(i + 1, 12) if abs(float(d[i, j] - edge)) < 1e-9]


# radial bond / surface bond in a regular icosahedron: edge = R · 4 / sqrt(10 + 2 sqrt 5) ≈ 1.0515 R
_EDGE_OVER_RADIUS = 4 / math.sqrt(10 + 2 * math.sqrt(5))


def _radius_for_bond(bond_length: float) -> float:
    """Shell radius whose radial and surface bonds average ``bond_length``."""
    if not bond_length > 0:
        raise ValueError(f"bond_length must be positive, got {bond_length}")
    return bond_length / ((1 + _EDGE_OVER_RADIUS) / 2)


def icosahedron_13(bond_length: float = 1.0) -> Tensor:
    """The 13-atom icosahedron (centre + 12 vertices), flattened ``(39,)`` float64, COM-free.

    Scaled so the mean of the radial and surface nearest-neighbour distances is
    ``bond_length`` (1 = the LJ pair minimum r_m; the true minimum is a little tighter)."""
    r = _radius_for_bond(bond_length)
    pos = torch.cat([torch.zeros(1, 3, dtype=torch.float64), r * icosahedron_vertices()])
    return remove_com(pos.reshape(-1), 13, 3)


def mackay_icosahedron_55(bond_length: float = 1.0) -> Tensor:
    """The 55-atom two-shell Mackay icosahedron, flattened ``(165,)`` float64, COM-free.

    Centre; 12 vertices at radius r; 12 vertices at 2r and the 30 midpoints of the edges of
    that doubled icosahedron (each second-shell edge then holds three atoms, spaced like
    the first shell's edges). r is set from ``bond_length`` as in :func:`icosahedron_13`."""
    r = _radius_for_bond(bond_length)
    v = icosahedron_vertices()
    outer = 2 * r * v
    midpoints = torch.stack([(outer[i] + outer[j]) / 2 for i, j in icosahedron_edges()])
    pos = torch.cat([torch.zeros(1, 3, dtype=torch.float64), r * v, outer, midpoints])
    return remove_com(pos.reshape(-1), 55, 3)
