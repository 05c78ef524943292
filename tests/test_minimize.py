"""Tests of boltzlab.minimize against published minima (Cambridge Cluster Database, Müller-Brown)
and against geometric facts of the icosahedron."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.energies import MullerBrown, lj13, lj_standard
from boltzlab.minimize import (
    icosahedron_13,
    icosahedron_edges,
    icosahedron_vertices,
    mackay_icosahedron_55,
    minimize_energy,
)

# Global minima of standard Lennard-Jones (unique pairs, eps = r_m = 1, no tether) from the
# Cambridge Cluster Database, in units of eps (energies do not depend on the length unit).
LJ13_GLOBAL_MINIMUM = -44.326801
LJ55_GLOBAL_MINIMUM = -279.248470


def test_icosahedron_geometry() -> None:
    v = icosahedron_vertices()
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(12, dtype=torch.float64))
    edges = icosahedron_edges()
    assert len(edges) == 30
    degree = torch.zeros(12, dtype=torch.long)
    for i, j in edges:
        degree[i] += 1
        degree[j] += 1
    assert bool((degree == 5).all())  # every vertex of an icosahedron has five neighbours
    # edge over circumradius of a regular icosahedron: 4 / sqrt(10 + 2 sqrt 5)
    i, j = edges[0]
    assert float((v[i] - v[j]).norm()) == pytest.approx(4 / math.sqrt(10 + 2 * math.sqrt(5)), rel=1e-12)


def test_cluster_builders_are_com_free_and_have_the_mackay_shells() -> None:
    x13, x55 = icosahedron_13(), mackay_icosahedron_55()
    assert x13.shape == (39,) and x55.shape == (165,)
    for x, n in ((x13, 13), (x55, 55)):
        assert float(x.reshape(n, 3).mean(0).abs().max()) < 1e-12
    r = x55.reshape(55, 3).norm(dim=-1).sort().values
    r1 = float(r[1])
    assert float(r[0]) < 1e-12
    torch.testing.assert_close(r[1:13], torch.full((12,), r1, dtype=torch.float64))
    # 30 edge midpoints of the doubled icosahedron sit at 2 r1 cos(half the edge angle)
    mid = 2 * r1 * math.sqrt(1 - (2 / math.sqrt(10 + 2 * math.sqrt(5))) ** 2)
    torch.testing.assert_close(r[13:43], torch.full((30,), mid, dtype=torch.float64))
    torch.testing.assert_close(r[43:], torch.full((12,), 2 * r1, dtype=torch.float64))
    # no two atoms closer than 0.9 bond lengths: a sensible start for minimisation
    d = torch.pdist(x55.reshape(55, 3))
    assert float(d.min()) > 0.9


@pytest.mark.parametrize(("n", "build", "expected"), [
    (13, icosahedron_13, LJ13_GLOBAL_MINIMUM),
    (55, mackay_icosahedron_55, LJ55_GLOBAL_MINIMUM),
])
def test_lennard_jones_global_minima_from_perturbed_icosahedra(n: int, build, expected: float) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = build() + 0.03 * torch.randn(3, 3 * n, generator=g, dtype=torch.float64)
    res = minimize_energy(lj_standard(n), x0)
    assert res.converged
    # the database prints six decimals, so agreement is to its rounding (5e-7) plus ours
    torch.testing.assert_close(res.energy, torch.full((3,), expected, dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(res.x.reshape(3, n, 3).mean(1).abs().max()) < 1e-12  # COM removed


def test_benchmark_lj13_minimum_is_sandwiched_by_the_standard_minimum() -> None:
    """The benchmark energy is E_b = 2 E_std + T with the tether T = 0.5 sum |x_i - mean|^2 >= 0.

    So min E_b >= 2 min E_std (both terms bounded below), and min E_b <= E_b(x*_std) =
    2 min E_std + T(x*_std) (the standard minimiser is one candidate). The tether pulls
    the benchmark minimum slightly inside: strictly between the two bounds."""
    std = minimize_energy(lj_standard(13), icosahedron_13())
    tether_at_std = 0.5 * float((std.x.reshape(13, 3) ** 2).sum())
    bench = minimize_energy(lj13(), icosahedron_13())
    e_b = float(bench.energy)
    assert 2 * LJ13_GLOBAL_MINIMUM < e_b < 2 * LJ13_GLOBAL_MINIMUM + tether_at_std
    assert e_b < float(lj13().energy(std.x))  # strictly better than the unrelaxed candidate
    assert tether_at_std == pytest.approx(5.57, abs=0.05)  # 6 r^2 for 12 atoms at r ~ 0.96


def test_muller_brown_minima() -> None:
    starts = torch.tensor([[-0.5, 1.5], [0.6, 0.0], [0.0, 0.5]], dtype=torch.float64)
    res = minimize_energy(MullerBrown(), starts)
    expected_x = torch.tensor([[-0.558, 1.442], [0.623, 0.028], [-0.050, 0.467]], dtype=torch.float64)
    torch.testing.assert_close(res.x, expected_x, atol=1e-3, rtol=0)
    torch.testing.assert_close(res.energy, torch.tensor([-146.6995, -108.1667, -80.7678], dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_minimize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        minimize_energy(lj13(), torch.zeros(5, 38, dtype=torch.float64))
    with pytest.raises(ValueError, match="force_tolerance"):
        minimize_energy(lj13(), icosahedron_13(), force_tolerance=0.0)
    with pytest.raises(ValueError, match="bond_length"):
        icosahedron_13(bond_length=-1.0)
