"""Targets: conventions, analytic forces, exact quantities, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzlab import energies as en

ALL = {
    "double_well": en.DoubleWell2D(),
    "muller_brown": en.MullerBrown(),
    "gmm40": en.GaussianMixture(),
    "many_well": en.ManyWell(),
    "dw4": en.dw4(),
    "lj13": en.lj13(),
    "lj55": en.lj55(),
    "lj13_standard": en.lj_standard(13),
}


def _points(e: en.Energy, shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if e.is_particle_system:  # spread-out, non-overlapping clusters
        scale = 1.3 if e.name.startswith("lj") else 2.0
        x = scale * torch.randn(*shape, e.dim, generator=g, dtype=torch.float64)
        return e.remove_com(x).to(dtype)
    return (3 * torch.randn(*shape, e.dim, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forces_are_minus_autograd_gradient(name, dtype):
    e = ALL[name]
    x = _points(e, (3, 4), dtype).requires_grad_(True)
    energy, forces = e.energy_and_forces(x)
    assert energy.shape == (3, 4) and forces.shape == (3, 4, e.dim)
    assert energy.dtype == forces.dtype == dtype
    (grad,) = torch.autograd.grad(energy.sum(), x)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    scale = grad.abs().amax(-1, keepdim=True).clamp_min(1.0)
    assert torch.allclose(-grad / scale, forces / scale, atol=tol, rtol=0)
    assert torch.allclose(e.energy(x), energy)


def test_gmm40_means_follow_the_convention():
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        expected = (torch.rand(40, 2) - 0.5) * 80
    finally:
        torch.random.set_rng_state(state)
    assert torch.equal(en.gmm40_means(), expected)
    gmm = en.GaussianMixture()
    assert gmm.n_modes == 40 and abs(gmm.std - math.log1p(math.e)) < 1e-6 and abs(gmm.std - 1.3133) < 1e-4


def test_gmm40_is_normalised_and_exactly_sampled():
    gmm = en.GaussianMixture()
    h = 0.2
    u = torch.arange(-60, 60, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    mass = torch.exp(-gmm.energy(grid)).sum() * h * h
    assert abs(float(mass) - 1.0) < 1e-6  # log Z = 0 at kT = 1
    x = gmm.sample(200_000, torch.Generator().manual_seed(1), dtype=torch.float64)
    # moments of the mixture: mean of the means, covariance of the means + s^2 I
    mu = gmm.means.double()
    cov = torch.cov(mu.T, correction=0) + gmm.std**2 * torch.eye(2, dtype=torch.float64)
    se = torch.sqrt(torch.diag(cov) / x.shape[0])
    assert torch.all((x.mean(0) - mu.mean(0)).abs() < 4 * se)
    assert torch.allclose(torch.cov(x.T), cov, rtol=0.02)
    counts = torch.bincount(gmm.nearest_mode(mu), minlength=40)
    assert torch.equal(counts, torch.ones(40, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gmm40_energy_matches_torch_distributions(dtype):
    # an independent mixture density, at samples, at the means and far outside the modes
    # (where float32 rounding of the squared distances matters most)
    gmm = en.GaussianMixture()
    mu = gmm.means.double()
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(40, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(mu, torch.full_like(mu, gmm.std)), 1))
    g = torch.Generator().manual_seed(3)
    x = torch.cat([gmm.sample(2_000, g, dtype=torch.float64), mu,
                   (torch.rand(2_000, 2, generator=g, dtype=torch.float64) - 0.5) * 160])
    xr = x.clone().requires_grad_(True)
    logp = ref.log_prob(xr)
    (grad,) = torch.autograd.grad(logp.sum(), xr)
    logp = logp.detach()
    energy, forces = gmm.energy_and_forces(x.to(dtype))
    atol = 1e-9 if dtype == torch.float64 else 1e-3
    scale = 1.0 + logp.abs()
    assert float(((energy.double() + logp) / scale).abs().max()) < atol
    assert float(((forces.double() - grad) / (1.0 + grad.abs())).abs().max()) < atol


def test_double_well_exact_quantities():
    dw = en.DoubleWell2D()
    p_left, p_right = dw.well_probabilities()
    assert abs(p_left - 0.967) < 5e-4 and abs(p_left + p_right - 1) < 1e-12
    assert abs(dw.well_free_energy_difference() - 3.38) < 5e-3
    # log Z against a brute-force 2-D grid
    h = 0.01
    u = torch.arange(-4, 4, h, dtype=torch.float64)
    v = torch.arange(-9, 9, h, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(u, v, indexing="ij"), -1).reshape(-1, 2)
    brute = math.log(float(torch.exp(-dw.energy(grid)).sum()) * h * h)
    assert abs(dw.log_z() - brute) < 1e-6
    hot = dw.at_temperature(5.0)
    assert hot.kT == 5.0 and 0.5 < hot.well_probabilities()[0] < p_left


@pytest.mark.parametrize("kT", [1.0, 3.0])
def test_double_well_exact_samples(kT):
    dw = en.DoubleWell2D(kT=kT)
    n = 200_000
    x = dw.sample(n, torch.Generator().manual_seed(2), dtype=torch.float64)
    p = dw.well_probabilities()[0]
    assert abs(float((x[:, 0] < 0).double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert abs(float(x[:, 1].var()) - kT) < 4 * kT * math.sqrt(2 / n)
    # E[dE/dx1] = 0 under the exact density (integration by parts), checks the x1 marginal
    f1 = dw.forces(x)[:, 0]
    assert abs(float(f1.mean())) < 4 * float(f1.std()) / math.sqrt(n)


def test_many_well_log_z_is_product_of_blocks():
    mw = en.ManyWell()
    assert mw.dim == 32
    h = 0.01
    u = np.arange(-5, 5, h)
    block = np.log(np.exp(-(u**4 - 6 * u**2 - 0.5 * u)).sum() * h) + 0.5 * math.log(2 * math.pi)
    assert abs(mw.log_z() - 16 * block) < 1e-6
    assert abs(mw.log_z() - 164.6957) < 1e-3
    x = torch.zeros(2, 32)
    x[1, 0] = 1.0
    assert torch.allclose(mw.energy(x), torch.tensor([0.0, 1 - 6 - 0.5]))
    with pytest.raises(ValueError, match="even dimension"):
        en.ManyWell(dim=5)


def test_muller_brown_minima():
    mb = en.MullerBrown()
    x = torch.tensor([[-0.558224, 1.441726], [0.623499, 0.028038], [-0.050011, 0.466694]], dtype=torch.float64)
    e, f = mb.energy_and_forces(x)
    assert torch.allclose(e, torch.tensor([-146.699517, -108.166724, -80.767819], dtype=torch.float64), atol=1e-4)
    assert f.abs().max() < 1e-2


def test_dw4_by_hand():
    e = en.dw4()
    square = torch.tensor([0.0, 0.0, 4.0, 0.0, 4.0, 4.0, 0.0, 4.0], dtype=torch.float64)
    t = 4 * math.sqrt(2) - 4  # two diagonals; the four sides sit at d0 = 4 and contribute 0
    assert abs(float(e.energy(square)) - 2 * (0.9 * t**4 - 4 * t**2)) < 1e-12
    assert e.n_particles == 4 and e.spatial_dim == 2 and e.effective_dim == 6


def test_lj_conventions():
    """Benchmark = 2 x unique-pair LJ + 0.5 sum |x_i - mean|^2; a pair at r_m = 1 has energy -1."""
    two = torch.tensor([0.0, 0, 0, 1.0, 0, 0], dtype=torch.float64)
    std = en.lj_standard(2)
    assert abs(float(std.energy(two)) + 1.0) < 1e-12
    bench = en.lj_benchmark(2)
    assert abs(float(bench.energy(two)) - (2 * -1.0 + 0.5 * 2 * 0.25)) < 1e-12
    x = _points(en.lj13(), (5,), torch.float64)
    r = x.reshape(5, 13, 3)
    harm = 0.5 * ((r - r.mean(1, keepdim=True)) ** 2).sum((1, 2))
    assert torch.allclose(en.lj13().energy(x), 2 * en.lj_standard(13).energy(x) + harm)
    # ordered-pair sum written out explicitly
    d = torch.cdist(r, r)
    off = ~torch.eye(13, dtype=torch.bool)
    ordered = ((1 / d[:, off]) ** 12 - 2 * (1 / d[:, off]) ** 6).sum(-1)
    assert torch.allclose(en.lj13().energy(x), ordered + harm)
    assert en.lj13().dim == 39 and en.lj55().dim == 165 and en.lj13().kT == 1.0


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_particle_symmetries(name):
    e = ALL[name]
    x = _points(e, (4,), torch.float64)
    n, d = e.n_particles, e.spatial_dim
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    r = x.reshape(4, n, d)
    moved = (r @ q.T + torch.randn(d, dtype=torch.float64)).reshape(4, -1)
    perm = r[:, torch.randperm(n, generator=torch.Generator().manual_seed(4))].reshape(4, -1)
    assert torch.allclose(e.energy(moved), e.energy(x))
    assert torch.allclose(e.energy(perm), e.energy(x))
    f = e.forces(x).reshape(4, n, d)
    assert (f.sum(1).abs().max() / f.abs().max()) < 1e-12  # COM-free forces: samplers stay in the subspace
    assert torch.allclose(e.remove_com(x + 1.0), e.remove_com(x))


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_overlapping_particles_give_documented_finite_values(name):
    e = ALL[name]
    x = _points(e, (2,), torch.float32)
    d = e.spatial_dim
    x[0, d : 2 * d] = x[0, :d]  # particles 0 and 1 on top of each other
    x[1, d : 2 * d] = x[1, :d] + 1e-4
    energy, forces = e.energy_and_forces(x)
    assert torch.isfinite(energy).all() and torch.isfinite(forces).all()
    if name == "lj13":
        assert (energy > 1e20).all()  # clamped at PAIR_MIN_DISTANCE: huge, finite


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(3, 38), r"expected shape \(\.\.\., 39\), got \(3, 38\)"),
        (torch.zeros(3, 39, dtype=torch.long), "floating tensor"),
        (torch.tensor([[float("nan")] * 39, [0.0] * 39]), r"NaN or infinite coordinates \(1 configuration"),
        (torch.full((39,), float("inf")), "NaN or infinite"),
        (np.zeros(39), "expected a torch.Tensor"),
    ],
)
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(en.EnergyInputError, match=match):
        en.lj13().energy(bad)


def test_registry_and_temperature():
    assert set(en.TARGETS) >= {"double_well", "gmm40", "many_well", "dw4", "lj13", "lj55"}
    with pytest.raises(KeyError, match="unknown target 'lj7'"):
        en.get_target("lj7")
    with pytest.raises(ValueError, match="positive"):
        en.DoubleWell2D().at_temperature(-1.0)
    x = torch.randn(5, 2)
    hot = en.DoubleWell2D().at_temperature(2.0)
    assert torch.allclose(hot.log_prob(x), -en.DoubleWell2D().energy(x) / 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    for e in ALL.values():
        x = _points(e, (3,), torch.float64)
        ec, fc = e.energy_and_forces(x.cuda())
        eh, fh = e.energy_and_forces(x)
        assert torch.allclose(ec.cpu(), eh) and torch.allclose(fc.cpu(), fh)
