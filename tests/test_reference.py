"""Tests of the shipped MCMC reference sets (boltzlab/data) and of boltzlab.reference.

The sets are checked against physics (the virial and configurational-temperature
identities), against their own mixing diagnostics, and, when ../shared/reference is
present, against the external MCMC sets that the literature evaluates with."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzlab import mcmc
from boltzlab.energies import PairPotential, remove_com
from boltzlab.metrics import energy_w2
from boltzlab.reference import (
    DATA_DIR,
    RECIPES,
    build_reference,
    load_reference,
    reference_provenance,
)

EXTERNAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
EXTERNAL_FILES = {"dw4": "test_split_DW4.npy", "lj13": "test_split_LJ13-1000.npy"}
NAMES = list(RECIPES)


def _energy(name: str) -> PairPotential:
    return RECIPES[name].make_energy()


def _by_chain(values: torch.Tensor, name: str) -> torch.Tensor:
    """Stored order is positions[k * n_chains + c]: back to a (n_kept, n_chains) trace."""
    n_chains = reference_provenance(name)["n_chains"]
    return values.reshape(-1, n_chains)


# LJ-55's 10,000 x 1,485 pair distances make each check take seconds: marked slow
@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n == "lj55" else n for n in NAMES])
def shipped(request) -> tuple[str, torch.Tensor]:
    name = request.param
    return name, load_reference(name)


def test_shipped_sets_have_the_promised_shape_dtype_and_zero_centre_of_mass(shipped) -> None:
    name, x = shipped
    energy = _energy(name)
    assert x.dtype == torch.float32 and x.shape == (10_000, energy.dim)
    assert bool(torch.isfinite(x).all())
    com = x.double().reshape(-1, energy.n, energy.d_space).mean(1)
    assert float(com.abs().max()) < 1e-5
    with np.load(DATA_DIR / f"{name}.npz") as data:
        stored_e = torch.from_numpy(data["energies"]).double()
    torch.testing.assert_close(stored_e, energy.energy(x.double()), rtol=1e-5, atol=1e-4)


def test_virial_identity_holds_on_shipped_sets(shipped) -> None:
    """E[x · ∇E] = d_eff kT by integration by parts over the space the samples live in.

    The energies are translation invariant (the tether acts on x_i - mean(x)), so the
    samples fill the (n - 1) d dimensional COM-free subspace, ∇E lies in it, and
    exp(-E/kT) vanishes at its boundary (tether or quartic growth; LJ cores): hence
    d_eff = (n - 1) d: 6 for DW-4, 36 for LJ-13, 162 for LJ-55. The tether does not change
    d_eff; it only makes the integral converge for LJ."""
    name, x = shipped
    energy = _energy(name)
    x = x.double()
    virial = -(x * energy.forces(x)).sum(-1)
    se = mcmc.monte_carlo_standard_error(_by_chain(virial, name))
    assert 4 * se < 0.4 * energy.effective_dim  # the check below would catch a 40% error
    assert abs(float(virial.mean()) - energy.effective_dim * energy.kT) < 4 * se


def _laplacian_by_autograd(energy: PairPotential, x: torch.Tensor) -> torch.Tensor:
    """ΔE = -∇·F, brute force: autograd through the analytic forces, one coordinate at a time."""
    x = x.clone().requires_grad_(True)
    forces = energy.forces(x)
    lap = torch.zeros(x.shape[0], dtype=x.dtype)
    for k in range(energy.dim):
        lap -= torch.autograd.grad(forces[:, k].sum(), x, retain_graph=True)[0][:, k]
    return lap


def _laplacian(energy: PairPotential, x: torch.Tensor) -> torch.Tensor:
    """ΔE for a pair potential, (n, dim) -> (n,): each pair adds 2 c [u''(d) + (D - 1) u'(d) / d]
    (the Laplacian of a radial function, with respect to both particles), the tether
    0.5 k sum_i |x_i - mean|^2 adds k D (n - 1). u'' comes from autograd of u' (elementwise)."""
    d = energy.pair_distances(x).clone().requires_grad_(True)
    du = energy.pair_derivative(d)
    d2u = torch.autograd.grad(du.sum(), d)[0]
    pairs = 2 * energy.pair_factor * (d2u + (energy.d_space - 1) * du / d)
    return pairs.detach().sum(-1) + energy.harmonic * energy.d_space * (energy.n - 1)


def test_fast_laplacian_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for name in NAMES:
        x = load_reference(name, n=3, generator=g).double()
        energy = _energy(name)
        torch.testing.assert_close(_laplacian(energy, x), _laplacian_by_autograd(energy, x))


def test_configurational_temperature_identity_holds_on_shipped_sets(shipped) -> None:
    """E[|∇E|^2] = kT E[ΔE]: integrate ∇·(∇E e^{-E/kT}) = 0 over the COM-free subspace.

    Independent of the virial identity (it weighs curvature, not size). E is translation
    invariant, so its full-space Laplacian equals the subspace one. Tested as
    E[|∇E|^2 - kT ΔE] = 0 within 4 standard errors."""
    name, x = shipped
    energy = _energy(name)
    n_chains = reference_provenance(name)["n_chains"]
    x = x.double()
    residual = (energy.forces(x) ** 2).sum(-1) - energy.kT * _laplacian(energy, x)
    se = mcmc.monte_carlo_standard_error(residual.reshape(-1, n_chains))
    assert abs(float(residual.mean())) < 4 * se


def test_provenance_is_complete_and_diagnostics_pass(shipped) -> None:
    name, x = shipped
    p = reference_provenance(name)
    required = ["seed", "n_chains", "n_steps", "burn_in", "thin", "step_size_mean", "acceptance_mean",
                "rhat_energy", "integrated_autocorrelation_time", "n_energy_evaluations", "wall_time_s",
                "torch_version", "command", "mean_energy", "mean_energy_se"]
    assert not [k for k in required if k not in p]
    assert p["checks_passed"] and p["n_samples"] == x.shape[0]
    assert p["rhat_energy"] < 1.01
    assert p["thin"] >= 2 * p["integrated_autocorrelation_time"]
    assert abs(p["acceptance_mean"] - mcmc.TARGET_ACCEPTANCE["mala"]) < 0.05
    # energy stationary after burn-in: no block mean of the kept run strays beyond 4 errors
    block_means = np.array(p["energy_block_means"])
    assert np.abs(block_means - block_means.mean()).max() < 4 * p["energy_block_se"]
    # and the stored energies reproduce the recorded mean
    e = _energy(name).energy(x.double())
    assert float(e.mean()) == pytest.approx(p["mean_energy"], abs=1e-3)


def test_shipped_energies_are_nearly_uncorrelated_along_each_chain(shipped) -> None:
    """Kept states are ``thin`` >= 2 IATs apart, so the lag-1 autocorrelation of the kept
    energies is small (exp(-2) ≈ 0.14 for an exponential autocorrelation)."""
    name, x = shipped
    trace = _by_chain(_energy(name).energy(x.double()), name)
    assert float(mcmc.autocorrelation(trace)[1]) < 0.2


# ----------------------------------------------------------------------------------------
# Against the external reference sets (skipped when ../shared/reference is absent)
# ----------------------------------------------------------------------------------------


def _external(name: str) -> torch.Tensor:
    path = EXTERNAL_DIR / EXTERNAL_FILES[name]
    if not path.is_file():
        pytest.skip(f"external reference set {path} not present")
    x = torch.from_numpy(np.load(path)).double()
    energy = _energy(name)
    return remove_com(x, energy.n, energy.d_space)  # the DW-4 file is not centred


EXTERNAL_DW4_BIAS = (
    "the external DW-4 set's mean energy (-22.450 +- 0.019) lies 0.09 (4.8 standard errors) above "
    "the exact value -22.5415 from 5-D quadrature (test_dw4_mean_energy_by_quadrature), which our "
    "set matches (-22.537 +- 0.02), as do a long parallel-tempering run (-22.541 +- 0.003) and "
    "random-walk Metropolis (-22.540 +- 0.007): the external set is locally equilibrated at kT = 1 "
    "but holds too few two-short-pair clusters "
    "(see test_external_dw4_set_is_locally_equilibrated_but_its_structure_populations_differ)"
)


def _dw4_quadrature(h: float = 0.25, half_width: float = 7.0) -> tuple[float, float]:
    """<E> and std(E) of DW-4 at kT = 1 by trapezoidal quadrature, independent of any MCMC.

    Translations and rotations drop out of the COM-free density: put particle 1 at the
    origin and particle 2 at (r, 0) (integrating its angle gives the factor 2 pi r), and
    integrate particles 3 and 4 over a Cartesian grid:
    <f> = int r f e^{-E} dr dx3 dy3 dx4 dy4 / int r e^{-E} ...
    Pair distances outside [1, 7] cost more than 36 kT, so the box loses nothing, and the
    trapezoidal rule on a smooth integrand that vanishes at the box edges converges
    exponentially in 1/h (h = 0.25 and 0.2 agree to 2e-4)."""
    g = torch.arange(-half_width, half_width + 1e-9, h, dtype=torch.float64)
    gx, gy = (a.reshape(-1) for a in torch.meshgrid(g, g, indexing="ij"))

    def pair(d: torch.Tensor) -> torch.Tensor:
        u = d - 4.0
        return 0.9 * u**4 - 4.0 * u**2

    z = ez = e2z = 0.0
    for r in torch.arange(h, half_width + 1e-9, h, dtype=torch.float64):
        e_one = pair(torch.hypot(gx, gy)) + pair(torch.hypot(gx - r, gy))  # one free particle vs 1 and 2
        keep = e_one < 60.0
        px, py, pe = gx[keep], gy[keep], e_one[keep]
        for s in range(0, px.numel(), 256):
            e = (pair(r) + pe[s:s + 256, None] + pe[None]
                 + pair(torch.hypot(px[s:s + 256, None] - px[None], py[s:s + 256, None] - py[None])))
            w = torch.exp(-e) * r
            z, ez, e2z = z + float(w.sum()), ez + float((w * e).sum()), e2z + float((w * e * e).sum())
    mean = ez / z
    return mean, math.sqrt(e2z / z - mean**2)


def test_dw4_mean_energy_by_quadrature() -> None:
    """Our DW-4 reference set against the exact <E> and std(E) from quadrature."""
    mean, std = _dw4_quadrature()
    assert mean == pytest.approx(-22.5415, abs=2e-3)  # converged value (h = 0.2, box 8 gives -22.54151)
    e = _energy("dw4").energy(load_reference("dw4").double())
    se = float(e.std()) * math.sqrt(reference_provenance("dw4")["iat_of_kept_samples"] / len(e))
    assert abs(float(e.mean()) - mean) < 3 * se, (float(e.mean()), mean, se)
    assert float(e.std()) == pytest.approx(std, rel=0.03)
    if (EXTERNAL_DIR / EXTERNAL_FILES["dw4"]).is_file():
        # the external set misses the exact value by more than 3 of its standard errors
        e_ext = _energy("dw4").energy(_external("dw4"))
        assert abs(float(e_ext.mean()) - mean) > 3 * float(e_ext.std()) / math.sqrt(len(e_ext))


@pytest.mark.parametrize("name", [
    "lj13",
    pytest.param("dw4", marks=pytest.mark.xfail(reason=EXTERNAL_DW4_BIAS, strict=True)),
])
def test_mean_energy_agrees_with_external_set(name: str) -> None:
    energy = _energy(name)
    e_ext = energy.energy(_external(name))
    e_ours = energy.energy(load_reference(name).double())
    # both sets are (nearly) decorrelated: standard errors std/sqrt(n); ours is widened by the
    # IAT of its kept samples, as recorded in the provenance
    iat_ours = reference_provenance(name)["iat_of_kept_samples"]
    se_ours = float(e_ours.std()) * math.sqrt(iat_ours / len(e_ours))
    se_ext = float(e_ext.std()) / math.sqrt(len(e_ext))
    diff = float(e_ours.mean() - e_ext.mean())
    assert abs(diff) < 3 * math.hypot(se_ours, se_ext), (diff, se_ours, se_ext)


@pytest.mark.parametrize("name", list(EXTERNAL_FILES))
def test_energy_w2_to_external_set_is_within_its_own_split_noise(name: str) -> None:
    """W2(ours, external) must be no larger than W2 between two random halves of the
    external set, plus a margin.

    If both sets come from the same distribution, W2 between independent samples of sizes
    n and m shrinks like sqrt(1/n + 1/m): the halves (5,000 vs 5,000) give the larger value
    on average, ours vs external (10,000 vs 10,000) about 1/sqrt(2) of it. The margin covers
    the noise of the half-vs-half value itself: we take its mean over 20 random splits and
    add two standard deviations of it across the splits. A real bias, e.g. a shift of the
    mean energy by a few standard errors, pushes W2 above this bound."""
    energy = _energy(name)
    e_ext = energy.energy(_external(name))
    e_ours = energy.energy(load_reference(name).double())
    g = torch.Generator().manual_seed(0)
    splits = []
    for _ in range(20):
        perm = torch.randperm(len(e_ext), generator=g)
        half = len(e_ext) // 2
        splits.append(energy_w2(e_ext[perm[:half]], e_ext[perm[half:]]))
    split_mean, split_std = float(np.mean(splits)), float(np.std(splits, ddof=1))
    w2 = energy_w2(e_ours, e_ext)
    assert w2 <= split_mean + 2 * split_std, (w2, split_mean, split_std)


def test_external_dw4_set_is_locally_equilibrated_but_its_structure_populations_differ() -> None:
    """Why the DW-4 mean energies disagree. A DW-4 cluster has either two or four short pair
    distances (d < 4, the inner well of the pair potential); the two structures interconvert
    slowly under local moves. Our set (parallel tempering, mixing checked on the mean pair
    distance) and the external one agree on the configurational temperature
    E|∇E|^2 / E[ΔE] = kT, a local property, but not on the share of two-short-pair clusters."""
    energy = _energy("dw4")
    ext = _external("dw4")
    ours = load_reference("dw4").double()
    for x in (ext, ours):
        g2, lap = (energy.forces(x) ** 2).sum(-1), _laplacian(energy, x)
        kT_conf = float(g2.mean() / lap.mean())
        se = float((g2 - kT_conf * lap).std() / lap.mean()) / math.sqrt(len(x))  # delta method
        assert abs(kT_conf - 1.0) < 4 * se
    share = [float(((energy.pair_distances(x) < 4).sum(-1) == 2).double().mean()) for x in (ext, ours)]
    se = math.sqrt(sum(p * (1 - p) for p in share) / 10_000)
    assert share[1] - share[0] > 5 * se, share  # external ~0.44, ours ~0.52


# ----------------------------------------------------------------------------------------
# Loading and building
# ----------------------------------------------------------------------------------------


def test_load_reference_subsets_and_errors(tmp_path: Path) -> None:
    full = load_reference("dw4")
    first = load_reference("dw4", n=100)
    torch.testing.assert_close(first, full[:100])
    a = load_reference("dw4", n=500, generator=torch.Generator().manual_seed(1))
    b = load_reference("dw4", n=500, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert a.shape == (500, 8) and a.dtype == torch.float32
    assert len({tuple(row.tolist()) for row in a}) == 500  # without replacement
    with pytest.raises(ValueError, match="between 1 and"):
        load_reference("dw4", n=10**6)
    with pytest.raises(ValueError, match="unknown reference set"):
        load_reference("lj38")
    with pytest.raises(FileNotFoundError, match="python -m boltzlab.reference build lj13"):
        load_reference("lj13", data_dir=tmp_path)


def test_tiny_build_writes_loadable_set_with_provenance(tmp_path: Path) -> None:
    recipe = dataclasses.replace(RECIPES["dw4"], n_chains=16, burn_in=200, thin=10, n_samples=160)
    prov = build_reference(recipe, seed=3, out_dir=tmp_path, compile_energy=False, check=False, progress=False)
    x = load_reference("dw4", data_dir=tmp_path)
    assert x.shape == (160, 8) and x.dtype == torch.float32
    assert float(x.reshape(-1, 4, 2).mean(1).abs().max()) < 1e-5
    assert reference_provenance("dw4", data_dir=tmp_path) == prov
    # every replica of every chain is evaluated once at the start and once per step
    assert prov["n_steps"] == 200 + 10 * 10
    assert prov["n_energy_evaluations"] == recipe.n_temps * 16 * (300 + 1)
    # same seed, same samples
    build_reference(recipe, seed=3, out_dir=tmp_path / "again", compile_energy=False, check=False, progress=False)
    torch.testing.assert_close(load_reference("dw4", data_dir=tmp_path / "again"), x)


def test_build_refuses_unconverged_run(tmp_path: Path) -> None:
    recipe = dataclasses.replace(RECIPES["dw4"], n_chains=8, burn_in=20, thin=1, n_samples=80)
    with pytest.raises(RuntimeError, match="unconverged"):
        build_reference(recipe, seed=0, out_dir=tmp_path, compile_energy=False, progress=False)
    assert not (tmp_path / "dw4.npz").exists()
