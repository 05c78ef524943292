"""Tests of boltzlab.mcmc: samplers against exact moments and exact samples, detailed balance,
the centre-of-mass constraint, and the diagnostics against processes with known answers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import signal, stats
from torch import Tensor

from boltzlab import mcmc
from boltzlab.energies import DoubleWell2D, Energy, GaussianMixture, dw4, lj13

# A correlated Gaussian: E = 0.5 x^T Σ^{-1} x, so x ~ N(0, kT Σ).
COVARIANCE = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
PRECISION = torch.linalg.inv(COVARIANCE)


@dataclass(frozen=True)
class CorrelatedGaussian(Energy):
    name: str = "correlated_gaussian"
    dim: int = 3
    kT: float = 1.0

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        px = (x.unsqueeze(-1) * PRECISION.to(x)).sum(-2)  # x^T Σ^{-1}; avoids BLAS overhead on tiny matrices
        return 0.5 * (px * x).sum(-1), (-px if want_forces else None)


@dataclass(frozen=True)
class TiltedDoubleWell1D(Energy):
    """E = x^4 - 2 x^2 + 0.5 x: non-Gaussian and asymmetric, so an uncorrected Langevin step is biased."""

    name: str = "tilted_double_well_1d"
    dim: int = 1
    kT: float = 1.0

    def _energy_and_forces(self, x: Tensor, want_forces: bool) -> tuple[Tensor, Tensor | None]:
        u = x[..., 0]
        e = u**4 - 2 * u**2 + 0.5 * u
        return e, (-(4 * u**3 - 4 * u + 0.5)).unsqueeze(-1) if want_forces else None


def _check_mean(trace: Tensor, exact: float, n_se: float = 4.0) -> None:
    """|mean(trace) - exact| within n_se Monte Carlo standard errors (IAT-based)."""
    se = mcmc.monte_carlo_standard_error(trace)
    assert abs(float(trace.mean()) - exact) < n_se * se, (float(trace.mean()), exact, se)


def _check_gaussian_moments(samples: Tensor, kT: float = 1.0) -> None:
    """Means 0 and every second moment E[x_i x_j] = kT Σ_ij, from (n_kept, n_chains, dim) samples."""
    for i in range(3):
        _check_mean(samples[..., i], 0.0)
        for j in range(i, 3):
            _check_mean(samples[..., i] * samples[..., j], kT * float(COVARIANCE[i, j]))


# ----------------------------------------------------------------------------------------
# Samplers against known distributions
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["mala", "rwm"])
def test_single_temperature_gaussian_moments_and_adapted_acceptance(kernel: str) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = 3 * torch.randn(128, 3, generator=g, dtype=torch.float64)
    res = mcmc.run_mcmc(CorrelatedGaussian(), x0, n_steps=2500, kernel=kernel, step_size=0.05,
                        burn_in=500, generator=g, progress=False)
    assert res.samples.shape == (2000, 128, 3) and res.energies.shape == (2000, 128)
    _check_gaussian_moments(res.samples)
    # adaptation hit its target; the frozen post-burn-in rate can only differ by noise
    target = mcmc.TARGET_ACCEPTANCE[kernel]
    assert abs(float(res.acceptance.mean()) - target) < 0.05
    torch.testing.assert_close(res.energies, CorrelatedGaussian().energy(res.samples))


def test_parallel_tempering_gaussian_every_replica_has_its_tempered_variance() -> None:
    g = torch.Generator().manual_seed(2)
    n_chains = 400
    x0 = torch.randn(n_chains, 3, generator=g, dtype=torch.float64)
    res = mcmc.run_parallel_tempering(CorrelatedGaussian(), x0, n_steps=1200, kT_max=4.0, n_temps=4,
                                      burn_in=300, generator=g, progress=False)
    _check_gaussian_moments(res.samples)
    # final replicas are independent across chains: replica k must be N(0, kT_k Σ)
    for k, kT in enumerate(res.kT.tolist()):
        var = res.final_state[k].var(dim=0)
        se = kT * COVARIANCE.diagonal() * math.sqrt(2 / (n_chains - 1))
        assert bool(((var - kT * COVARIANCE.diagonal()).abs() < 4 * se).all()), (k, var)
    assert res.swap_acceptance is not None and res.swap_acceptance.shape == (3,)
    assert bool((res.swap_acceptance > 0.2).all())


@pytest.mark.parametrize("kernel", ["mala", "rwm"])
def test_parallel_tempering_double_well_reproduces_exact_well_probability(kernel: str) -> None:
    target = DoubleWell2D()
    p_left = target.well_probabilities()[0]  # 0.967 by quadrature
    g = torch.Generator().manual_seed(3)
    x0 = torch.tensor([1.7, 0.0], dtype=torch.float64).expand(64, 2)  # all start in the shallow well
    res = mcmc.run_parallel_tempering(target, x0, n_steps=4000, kT_max=12.0, n_temps=6, kernel=kernel,
                                      step_size=0.1, burn_in=500, generator=g, progress=False)
    in_left = (res.samples[..., 0] < 0).double()
    se = mcmc.monte_carlo_standard_error(in_left)
    assert se < 0.01  # the check below must have power
    assert abs(float(in_left.mean()) - p_left) < 4 * se
    assert mcmc.rhat(in_left) < 1.05


def test_single_temperature_mala_is_stuck_in_the_double_well_start_well() -> None:
    """Why parallel tempering: at kT = 1 the 8 kT barrier keeps plain MALA in its well."""
    g = torch.Generator().manual_seed(4)
    x0 = torch.tensor([1.7, 0.0], dtype=torch.float64).expand(64, 2)
    res = mcmc.run_mcmc(DoubleWell2D(), x0, n_steps=1000, burn_in=200, generator=g, progress=False)
    assert float((res.samples[..., 0] < 0).double().mean()) < 0.05


@pytest.mark.parametrize("kernel", ["mala", "rwm"])
def test_gmm40_started_from_exact_samples_stays_exact(kernel: str) -> None:
    """Chains started at exact samples keep the target at every step, so the last states
    (independent across chains) must match fresh exact samples in distribution."""
    target = GaussianMixture()
    g = torch.Generator().manual_seed(5)
    n = 2000
    x0 = target.sample(n, generator=g).double()
    res = mcmc.run_mcmc(target, x0, n_steps=100, kernel=kernel, step_size=1.0, burn_in=30,
                        generator=g, progress=False)
    fresh = target.sample(n, generator=g).double()

    def radius2(x: Tensor) -> Tensor:  # squared distance to the nearest mean: the within-mode spread
        return ((x - target.means.double()[target.nearest_mode(x)]) ** 2).sum(-1)

    r2_chain, r2_fresh = radius2(res.final_state), radius2(fresh)
    se = math.sqrt((float(r2_chain.var()) + float(r2_fresh.var())) / n)
    assert abs(float(r2_chain.mean()) - float(r2_fresh.mean())) < 4 * se
    e_chain, e_fresh = target.energy(res.final_state), target.energy(fresh)
    assert stats.ks_2samp(e_chain.numpy(), e_fresh.numpy()).pvalue > 1e-3
    assert 0.15 < float(res.acceptance.mean()) < 0.9  # the chains moved


# ----------------------------------------------------------------------------------------
# Detailed balance of one MALA step
# ----------------------------------------------------------------------------------------


def _exact_1d_samples(target: Energy, n: int, generator: torch.Generator) -> Tensor:
    """Exact draws by inverting the CDF of exp(-E) tabulated on a fine grid."""
    grid = torch.linspace(-3.5, 3.5, 200_001, dtype=torch.float64)
    density = torch.exp(-target.energy(grid.unsqueeze(-1)))
    cdf = torch.cumsum(density, 0)
    cdf = cdf / cdf[-1]
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return grid[torch.searchsorted(cdf, u).clamp(max=grid.numel() - 1)].unsqueeze(-1)


def _bowker_symmetry_pvalue(x: Tensor, y: Tensor, edges: np.ndarray) -> float:
    """Bowker's test that the joint histogram of (x, y) is symmetric, as detailed balance implies."""
    h, _, _ = np.histogram2d(x.numpy().ravel(), y.numpy().ravel(), bins=[edges, edges])
    upper = np.triu_indices_from(h, k=1)
    a, b = h[upper], h.T[upper]
    keep = (a + b) > 0
    statistic = float((((a - b) ** 2)[keep] / (a + b)[keep]).sum())
    return float(stats.chi2.sf(statistic, int(keep.sum())))


def _uncorrected_mala_step(target: Energy, x: Tensor, tau: float, g: torch.Generator) -> Tensor:
    """A deliberately wrong kernel: Langevin proposal accepted as if it were symmetric."""
    e, f = target.energy_and_forces(x)
    y = x + tau * f + math.sqrt(2 * tau) * torch.randn(x.shape, generator=g, dtype=x.dtype)
    log_alpha = -(target.energy(y) - e)
    accept = torch.log(torch.rand(e.shape, generator=g, dtype=x.dtype)) < log_alpha
    return torch.where(accept.unsqueeze(-1), y, x)


def test_mala_step_satisfies_detailed_balance_and_the_test_catches_a_wrong_kernel() -> None:
    target = TiltedDoubleWell1D()
    g = torch.Generator().manual_seed(6)
    x = _exact_1d_samples(target, 200_000, g)
    edges = np.concatenate([[-np.inf], np.linspace(-1.6, 1.6, 13), [np.inf]])
    tau = 0.2  # large: roughly half the proposals are rejected
    y, accepted = mcmc.mala_step(target, x, tau, generator=g)
    assert 0.2 < float(accepted.double().mean()) < 0.9
    assert _bowker_symmetry_pvalue(x, y, edges) > 1e-3
    # stationarity: the new states are exact samples too
    assert stats.ks_2samp(x.numpy().ravel(), y.numpy().ravel()).pvalue > 1e-3
    y_bad = _uncorrected_mala_step(target, x, tau, g)
    assert _bowker_symmetry_pvalue(x, y_bad, edges) < 1e-6


def test_rwm_step_satisfies_detailed_balance() -> None:
    target = TiltedDoubleWell1D()
    g = torch.Generator().manual_seed(7)
    x = _exact_1d_samples(target, 200_000, g)
    edges = np.concatenate([[-np.inf], np.linspace(-1.6, 1.6, 13), [np.inf]])
    y, accepted = mcmc.rwm_step(target, x, 1.0, generator=g)
    assert 0.2 < float(accepted.double().mean()) < 0.9
    assert _bowker_symmetry_pvalue(x, y, edges) > 1e-3


def test_replica_swap_always_accepts_between_equal_temperatures_and_permutes_configurations() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, 3, generator=g, dtype=torch.float64)
    kT = torch.ones(3, dtype=torch.float64)
    new, accepted = mcmc.replica_swap_step(CorrelatedGaussian(), x, kT, parity=0, generator=g)
    assert bool(accepted[0].all()) and not bool(accepted[1].any())
    torch.testing.assert_close(new[0], x[1])
    torch.testing.assert_close(new[1], x[0])
    torch.testing.assert_close(new[2], x[2])


# ----------------------------------------------------------------------------------------
# Particle systems stay in the centre-of-mass-free subspace
# ----------------------------------------------------------------------------------------


def _com(energy: Energy, x: Tensor) -> Tensor:
    n, d = int(energy.n_particles), int(energy.spatial_dim)  # type: ignore[arg-type]
    return x.reshape(*x.shape[:-1], n, d).mean(-2)


@pytest.mark.parametrize("make", [dw4, lj13])
@pytest.mark.parametrize("tempering", [False, True])
def test_particle_chains_keep_zero_centre_of_mass(make, tempering: bool) -> None:
    energy = make()
    g = torch.Generator().manual_seed(9)
    n, d = energy.n_particles, energy.spatial_dim
    # a loose lattice so no pair overlaps, shifted off the origin on purpose
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * d, indexing="ij"), -1).reshape(-1, d)[:n]
    spacing = 3.5 if energy.name == "dw4" else 1.1
    x0 = (spacing * grid.reshape(-1) + 5.0 + 0.05 * torch.randn(16, n * d, generator=g)).float()
    kwargs = {"n_steps": 200, "burn_in": 50, "step_size": 1e-3, "generator": g, "progress": False}
    if tempering:
        res = mcmc.run_parallel_tempering(energy, x0, kT_max=3.0, n_temps=3, **kwargs)
    else:
        res = mcmc.run_mcmc(energy, x0, **kwargs)
    assert float(res.acceptance.mean()) > 0.2  # the chains moved
    assert float(_com(energy, res.samples).abs().max()) < 1e-5
    assert float(_com(energy, res.final_state).abs().max()) < 1e-5
    for step in (mcmc.mala_step, mcmc.rwm_step):
        moved, _ = step(energy, x0.double(), 1e-3, generator=g)
        assert float(_com(energy, moved).abs().max()) < 1e-12


# ----------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------


def _ar1(phi: float, n_steps: int, n_chains: int, g: torch.Generator) -> Tensor:
    """x_t = φ x_{t-1} + sqrt(1 - φ²) ε_t, started stationary; τ = (1 + φ)/(1 - φ)."""
    noise = torch.randn(n_steps, n_chains, generator=g, dtype=torch.float64).numpy()
    drive = math.sqrt(1 - phi**2) * noise
    drive[0] = noise[0]  # x_0 ~ N(0, 1): the chain starts stationary
    return torch.from_numpy(signal.lfilter([1.0], [1.0, -phi], drive, axis=0))


@pytest.mark.parametrize("method", ["geyer", "sokal"])
def test_integrated_autocorrelation_time_of_ar1_process(method: str) -> None:
    g = torch.Generator().manual_seed(10)
    for phi in (0.0, 0.5, 0.9):
        tau_exact = (1 + phi) / (1 - phi)
        tau = mcmc.integrated_autocorrelation_time(_ar1(phi, 20_000, 16, g), method=method)  # type: ignore[arg-type]
        assert abs(tau - tau_exact) < 0.1 * tau_exact, (phi, tau, tau_exact)


def test_geyer_catches_a_slow_minor_time_scale_that_the_sokal_window_cuts_off() -> None:
    """x = fast AR(1) (φ = 0.5, variance 0.9) + slow AR(1) (φ = 0.995, variance 0.1):
    ρ(t) = 0.9 · 0.5^t + 0.1 · 0.995^t, so τ = 0.9 · 3 + 0.1 · 399 = 42.6, mostly from the
    slow tail, which Sokal's window (5 τ of the fast part) truncates; MCMC energies of
    DW-4 and LJ clusters have tails like this."""
    g = torch.Generator().manual_seed(13)
    x = math.sqrt(0.9) * _ar1(0.5, 40_000, 32, g) + math.sqrt(0.1) * _ar1(0.995, 40_000, 32, g)
    tau_exact = 0.9 * 3.0 + 0.1 * 1.995 / 0.005
    tau = mcmc.integrated_autocorrelation_time(x)
    assert abs(tau - tau_exact) < 0.15 * tau_exact, (tau, tau_exact)
    assert mcmc.integrated_autocorrelation_time(x, method="sokal") < 0.6 * tau_exact
    rho = mcmc.autocorrelation(_ar1(0.9, 20_000, 16, g))
    torch.testing.assert_close(rho[1:4], torch.tensor([0.9, 0.81, 0.729], dtype=torch.float64), atol=0.02, rtol=0)


def test_rhat_is_one_for_iid_chains_and_large_for_stuck_chains() -> None:
    g = torch.Generator().manual_seed(11)
    iid = torch.randn(2000, 8, generator=g, dtype=torch.float64)
    assert abs(mcmc.rhat(iid) - 1.0) < 0.01
    stuck = iid + torch.arange(8, dtype=torch.float64)  # each chain at its own offset
    assert mcmc.rhat(stuck) > 1.1
    # one chain drifting within itself is caught by the split
    drifting = iid.clone()
    drifting[:, 0] += torch.linspace(-3, 3, 2000, dtype=torch.float64)
    assert mcmc.rhat(drifting) > 1.05


def test_standard_error_matches_spread_of_independent_replicate_means() -> None:
    g = torch.Generator().manual_seed(12)
    replicates = [_ar1(0.8, 4000, 4, g) for _ in range(30)]
    means = torch.tensor([float(r.mean()) for r in replicates])
    se = float(np.mean([mcmc.monte_carlo_standard_error(r) for r in replicates]))
    assert 0.7 < float(means.std()) / se < 1.4


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_input_raises_clear_value_errors() -> None:
    energy = CorrelatedGaussian()
    x0 = torch.zeros(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="nothing would be kept"):
        mcmc.run_mcmc(energy, x0, n_steps=10, burn_in=10, progress=False)
    with pytest.raises(ValueError, match="unknown kernel"):
        mcmc.run_mcmc(energy, x0, n_steps=10, kernel="hmc", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        mcmc.run_mcmc(energy, torch.zeros(3, dtype=torch.float64), n_steps=10, progress=False)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.run_mcmc(energy, x0, n_steps=10, step_size=-1.0, progress=False)
    with pytest.raises(ValueError, match="kT_min < kT_max"):
        mcmc.run_parallel_tempering(energy, x0, n_steps=10, kT_max=0.5, progress=False)
    with pytest.raises(ValueError, match="trace"):
        mcmc.rhat(torch.zeros(10, 2, 2))
    with pytest.raises(ValueError, match="zero variance"):
        mcmc.integrated_autocorrelation_time(torch.ones(100, 2))


def test_mala_refine_keeps_exact_samples_exact_and_moves_a_shifted_start_to_the_target() -> None:
    """mala_refine is MALA: from exact samples the correlated Gaussian's moments stay exact, and
    a start far from it relaxes to those moments; it returns the input dtype and shape."""
    g = torch.Generator().manual_seed(3)
    chol = torch.linalg.cholesky(COVARIANCE)
    exact = torch.randn(4000, 3, generator=g, dtype=torch.float64) @ chol.T
    out = mcmc.mala_refine(CorrelatedGaussian(), exact.float(), 40, generator=g, step_size=0.05)
    assert out.dtype == torch.float32 and out.shape == (4000, 3)
    assert not torch.equal(out, exact.float())
    for x in (out.double(), mcmc.mala_refine(CorrelatedGaussian(), exact + 4.0, 400, generator=g, step_size=0.05)):
        cov = x.T @ x / x.shape[0]
        se = (2.0 / x.shape[0]) ** 0.5 * 1.5
        assert float(x.mean(0).abs().max()) < 4 * (1.0 / x.shape[0]) ** 0.5
        assert float((cov - COVARIANCE).abs().max()) < 4 * se
    with pytest.raises(ValueError, match="n_steps"):
        mcmc.mala_refine(CorrelatedGaussian(), exact, 0)
