"""boltzlab.importance against exact values: Gaussians with known partition functions,
exact samples, the analytic probability-flow map of Gaussian targets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from boltzlab import importance as imp
from boltzlab.diffusion import GeometricNoiseSchedule, probability_flow_sample
from boltzlab.energies import DoubleWell2D, Energy, GaussianMixture, remove_com

F64 = torch.float64


# ----------------------------------------------------------------------------------------
# sampler_log_weights
# ----------------------------------------------------------------------------------------


def test_log_weights_of_the_exact_sampler_are_log_z():
    # GMM-40's energy is -log p (normalised, log Z = 0): with q = p every log-weight is log Z
    gmm = GaussianMixture()
    x = gmm.sample(500, torch.Generator().manual_seed(0), dtype=F64)
    log_q = -gmm.energy(x)
    log_w = imp.sampler_log_weights(gmm, x, log_q)
    assert log_w.dtype == F64 and log_w.shape == (500,)
    assert float(log_w.abs().max()) < 1e-10
    # at kT = 2 the target is p^(1/2) / Z_2, so log w = -E/2 - log p = E/2
    log_w2 = imp.sampler_log_weights(gmm, x, log_q, kT=2.0)
    assert torch.allclose(log_w2, gmm.energy(x) / 2, atol=1e-12)


@dataclass(frozen=True)
class _NaNRight(Energy):
    """E = |x|^2 / 2, but NaN for x_0 > 1 (a stand-in for a diverged energy)."""

    name: str = "nan_right"
    dim: int = 2
    kT: float = 1.0

    def _energy_and_forces(self, x: Tensor, want_forces: bool):
        e = 0.5 * (x**2).sum(-1)
        return torch.where(x[..., 0] > 1, torch.full_like(e, float("nan")), e), None


def test_log_weights_reject_bad_input():
    energy = _NaNRight()
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [3.0, 1.0]], dtype=F64)
    with pytest.raises(imp.ImportanceInputError, match="2 of 3 energies are not finite.*index 1"):
        imp.sampler_log_weights(energy, x, torch.zeros(3, dtype=F64))
    ok = x[:1]
    with pytest.raises(imp.ImportanceInputError, match=r"log_q: expected shape \(1,\)"):
        imp.sampler_log_weights(energy, ok, torch.zeros(3, dtype=F64))
    with pytest.raises(imp.ImportanceInputError, match=r"x: expected shape \(n, 2\)"):
        imp.sampler_log_weights(energy, torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64))
    with pytest.raises(imp.ImportanceInputError, match="log_q: 1 of 1 log-densities are not finite"):
        imp.sampler_log_weights(energy, ok, torch.tensor([float("nan")], dtype=F64))
    with pytest.raises(imp.ImportanceInputError, match="kT must be a positive"):
        imp.sampler_log_weights(energy, ok, torch.zeros(1, dtype=F64), kT=-1.0)
    assert issubclass(imp.ImportanceInputError, ValueError)


# ----------------------------------------------------------------------------------------
# log Z with a bootstrap interval
# ----------------------------------------------------------------------------------------

# a 1-D target with known Z: p~(x) = Z [0.3 N(-2, 0.5^2) + 0.7 N(1.5, 0.8^2)]
LOG_Z_1D = 1.3


def _log_mix(x: Tensor, weights, means, stds) -> Tensor:
    comps = [math.log(w) - 0.5 * ((x - m) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
             for w, m, s in zip(weights, means, stds)]
    return torch.logsumexp(torch.stack(comps), 0)


def _mixture_proposal_log_w(n: int, seed: int) -> Tensor:
    """Log-weights of n draws from q = 0.5 N(-2, 1) + 0.5 N(1.5, 1.2^2) toward the 1-D target."""
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(2, (n,), generator=g)
    x = torch.where(comp == 0, -2.0 + torch.randn(n, generator=g, dtype=F64),
                    1.5 + 1.2 * torch.randn(n, generator=g, dtype=F64))
    log_p = LOG_Z_1D + _log_mix(x, (0.3, 0.7), (-2.0, 1.5), (0.5, 0.8))
    return log_p - _log_mix(x, (0.5, 0.5), (-2.0, 1.5), (1.0, 1.2))


def test_bootstrap_interval_covers_exact_log_z_and_its_error_matches_the_spread():
    results = [imp.log_z_bootstrap(_mixture_proposal_log_w(2000, seed), n_boot=300,
                                   generator=torch.Generator().manual_seed(100 + seed)) for seed in range(20)]
    covered = sum(r.covers(LOG_Z_1D) for r in results)
    assert covered >= 16, covered  # 95 % intervals: 19 of 20 expected
    estimates = torch.tensor([r.estimate for r in results])
    spread = float(estimates.std())
    mean_se = sum(r.standard_error for r in results) / len(results)
    assert 0.6 < mean_se / spread < 1.6, (mean_se, spread)
    # and the delta-method SE of metrics.log_z_estimate agrees with the bootstrap
    lw = _mixture_proposal_log_w(2000, 0)
    assert imp.log_z_estimate(lw)[1] == pytest.approx(results[0].standard_error, rel=0.25)
    assert results[0].low < results[0].estimate < results[0].high and results[0].ess > 500


def test_bootstrap_rejects_bad_input():
    with pytest.raises(imp.ImportanceInputError, match="1 of 3 log-weights are not finite"):
        imp.log_z_bootstrap(torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(imp.ImportanceInputError, match="1-D tensor"):
        imp.log_z_bootstrap(torch.zeros(3, 2))
    with pytest.raises(imp.ImportanceInputError, match="level must lie in"):
        imp.log_z_bootstrap(torch.zeros(10), level=1.5)
    with pytest.raises(imp.ImportanceInputError, match="n_boot"):
        imp.log_z_bootstrap(torch.zeros(10), n_boot=0)


def test_subsamples_overestimate_ess_of_heavy_tailed_weights():
    # log w ~ N(0, s^2): the Kish ESS fraction of a large sample tends to exp(-s^2)
    g = torch.Generator().manual_seed(3)
    lw = 1.0 * torch.randn(200_000, generator=g, dtype=F64)
    assert imp.normalized_ess(lw) == pytest.approx(math.exp(-1.0), rel=0.03)
    heavy = 2.0 * torch.randn(200_000, generator=g, dtype=F64)
    small = imp.subsample_estimates(heavy, 16, 2000, generator=g)
    assert small.log_z.shape == (2000,) and small.ess.shape == (2000,)
    assert float(small.ess_fraction.min()) >= 1 / 16 - 1e-12 and float(small.ess_fraction.max()) <= 1 + 1e-12
    # exp(-4) = 0.018 for the pool; typical 16-sample draws report several times more
    assert float(small.ess_fraction.median()) > 5 * imp.normalized_ess(heavy)
    # equal weights: every subsample has ESS = size and log Z = the common log-weight
    flat = imp.subsample_estimates(torch.full((100,), 0.7), 16, 50, generator=g)
    assert torch.allclose(flat.ess, torch.full((50,), 16.0, dtype=F64)) and torch.allclose(flat.log_z, torch.full((50,), 0.7, dtype=F64))


# ----------------------------------------------------------------------------------------
# FEP and BAR between two Gaussians
# ----------------------------------------------------------------------------------------

# u0 = x^2 / 2 (Z0 = sqrt(2 pi)); u1 = (x - MU)^2 / (2 S^2) + C (Z1 = sqrt(2 pi) S e^-C)
MU, S, C = 1.0, 0.8, 0.5  # S > 1/sqrt(2): reverse FEP has finite variance too
DF_EXACT = C - math.log(S)  # -log(Z1 / Z0)


def _two_state_samples(n0: int, n1: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n0, generator=g, dtype=F64)
    x1 = MU + S * torch.randn(n1, generator=g, dtype=F64)

    def du(x: Tensor) -> Tensor:
        return (x - MU) ** 2 / (2 * S**2) + C - x**2 / 2

    return du(x0), du(x1)


def test_fep_and_bar_agree_with_the_exact_free_energy():
    du0, du1 = _two_state_samples(4000, 3000, seed=0)
    for est in (imp.fep_free_energy(du0, "forward"), imp.fep_free_energy(du1, "reverse"), imp.bar_free_energy(du0, du1)):
        assert abs(est.delta_f - DF_EXACT) < 4 * est.standard_error + 1e-3, (est, DF_EXACT)
        assert 0 < est.standard_error < 0.1
    bar = imp.bar_free_energy(du0, du1)
    assert bar.method == "BAR" and "ΔF" in str(bar)
    # swapping the roles of the states flips the sign exactly
    swapped = imp.bar_free_energy(-du1, -du0)
    assert swapped.delta_f == pytest.approx(-bar.delta_f, abs=1e-9)
    assert swapped.standard_error == pytest.approx(bar.standard_error, rel=1e-6)
    # identical states: ΔF = 0
    same = imp.bar_free_energy(torch.zeros(50, dtype=F64), torch.zeros(70, dtype=F64))
    assert abs(same.delta_f) < 1e-9


def test_bar_spread_over_seeds_is_smaller_than_fep_and_matches_its_error():
    runs = {"forward": [], "reverse": [], "bar": [], "bar_se": []}
    for seed in range(40):
        du0, du1 = _two_state_samples(300, 300, seed=seed)
        runs["forward"].append(imp.fep_free_energy(du0, "forward").delta_f)
        runs["reverse"].append(imp.fep_free_energy(du1, "reverse").delta_f)
        bar = imp.bar_free_energy(du0, du1)
        runs["bar"].append(bar.delta_f)
        runs["bar_se"].append(bar.standard_error)
    spread = {k: float(torch.tensor(v).std()) for k, v in runs.items() if k != "bar_se"}
    assert spread["bar"] < spread["forward"] and spread["bar"] < spread["reverse"], spread
    assert abs(float(torch.tensor(runs["bar"]).mean()) - DF_EXACT) < 3 * spread["bar"] / math.sqrt(40) + 1e-3
    mean_se = sum(runs["bar_se"]) / 40
    assert 0.7 < mean_se / spread["bar"] < 1.4, (mean_se, spread)


def test_free_energy_input_errors():
    with pytest.raises(imp.ImportanceInputError, match="direction must be"):
        imp.fep_free_energy(torch.zeros(5), "sideways")
    with pytest.raises(imp.ImportanceInputError, match="delta_u_1: 1 of 2 energy differences are not finite"):
        imp.bar_free_energy(torch.zeros(5), torch.tensor([0.0, float("inf")]))
    with pytest.raises(imp.ImportanceInputError, match="delta_u_0: no energy differences"):
        imp.bar_free_energy(torch.zeros(0), torch.zeros(3))


def test_state_free_energy_difference_of_the_double_well():
    dw = DoubleWell2D()
    exact = dw.well_free_energy_difference()
    estimates, errors = [], []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x = 1.5 * torch.randn(5000, 2, generator=g, dtype=F64)  # q = N(0, 1.5^2 I)
        log_q = -(x**2).sum(-1) / (2 * 1.5**2) - math.log(2 * math.pi * 1.5**2)
        log_w = imp.sampler_log_weights(dw, x, log_q)
        est = imp.state_free_energy_difference(log_w, x[:, 0] < 0, x[:, 0] >= 0)
        estimates.append(est.delta_f)
        errors.append(est.standard_error)
    mean = sum(estimates) / len(estimates)
    spread = float(torch.tensor(estimates).std())
    assert abs(mean - exact) < 4 * spread / math.sqrt(len(estimates)), (mean, exact)
    assert 0.6 < (sum(errors) / len(errors)) / spread < 1.6
    with pytest.raises(imp.ImportanceInputError, match="state B holds none"):
        imp.state_free_energy_difference(torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(imp.ImportanceInputError, match="overlap"):
        imp.state_free_energy_difference(torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(imp.ImportanceInputError, match=r"in_a: expected a boolean tensor of shape \(4,\)"):
        imp.state_free_energy_difference(torch.zeros(4), torch.ones(3, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------
# probability-flow ODE likelihood
# ----------------------------------------------------------------------------------------

# sigma_max >> the target's scale: the prior N(0, σ1^2) is then close to the true p_1 = p * N(0, σ1^2)
SCHEDULE = GeometricNoiseSchedule(sigma_min=0.01, sigma_max=40.0)
# a milder schedule (smaller log(σmax/σmin), so fewer Heun steps) for comparisons with the sampler's own density
MILD = GeometricNoiseSchedule(sigma_min=0.05, sigma_max=5.0)


def _rotated_gaussian(d: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Covariance Σ = R diag(s^2) R^T with a random rotation R: returns (R, s)."""
    g = torch.Generator().manual_seed(seed)
    r, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    s = torch.linspace(0.5, 2.0, d, dtype=F64)
    return r, s


def _gaussian_score(r: Tensor, s: Tensor, schedule: GeometricNoiseSchedule = SCHEDULE):
    """Exact score of p_t = N(0, Σ + σ_t^2 I): -(Σ + σ_t^2 I)^{-1} x, in the eigenbasis."""
    def score(x: Tensor, t: Tensor) -> Tensor:
        var = s**2 + schedule.variance(t)[:, None]  # (B, d)
        return -((x @ r) / var) @ r.T
    return score


def _transported_log_q(x0: Tensor, r: Tensor, s: Tensor, schedule: GeometricNoiseSchedule = SCHEDULE) -> Tensor:
    """The sampler's exact density: the ODE maps x0 to x1 = R diag(sqrt((s^2 + σ1^2)/s^2)) R^T x0,
    so log q(x0) = log N(x1; 0, σ1^2 I) + ½ Σ log((s^2 + σ1^2)/s^2)."""
    s1 = schedule.prior_std
    stretch = torch.sqrt((s**2 + s1**2) / s**2)
    x1 = ((x0 @ r) * stretch) @ r.T
    d = x0.shape[1]
    return (-0.5 * (x1**2).sum(-1) / s1**2 - 0.5 * d * math.log(2 * math.pi * s1**2)
            + torch.log(stretch).sum())


def _gaussian_log_p(x0: Tensor, r: Tensor, s: Tensor) -> Tensor:
    z = (x0 @ r) / s
    return -0.5 * (z**2).sum(-1) - torch.log(s).sum() - 0.5 * x0.shape[1] * math.log(2 * math.pi)


def test_pf_ode_exact_divergence_recovers_the_gaussian_density():
    r, s = _rotated_gaussian()
    g = torch.Generator().manual_seed(1)
    x0 = (torch.randn(64, 3, generator=g, dtype=F64) * s) @ r.T
    errors = {}
    for n_steps in (100, 400):
        log_q = imp.pf_ode_log_prob(_gaussian_score(r, s), SCHEDULE, x0, n_steps=n_steps)
        errors[n_steps] = float((log_q - _transported_log_q(x0, r, s)).abs().max())
    assert log_q.shape == (64,) and log_q.dtype == F64
    # the sampler's own density (analytic map of the prior): only the ODE discretisation error,
    # second order in the step (Heun): 4x the steps, about 16x smaller
    assert errors[400] < 1e-2 and errors[100] > 8 * errors[400], errors
    # the target's density: differs only by the prior N(0, σ1^2) vs the true N(0, Σ + σ1^2)
    assert float((log_q - _gaussian_log_p(x0, r, s)).abs().max()) < 2e-2


def test_pf_ode_likelihood_of_the_sampler_s_own_samples():
    # samples made by probability_flow_sample from the prior: their log q is log N(x1) + the log-det
    r, s = _rotated_gaussian(seed=4)
    score = _gaussian_score(r, s, MILD)
    g = torch.Generator().manual_seed(2)
    x1 = MILD.prior_std * torch.randn(32, 3, generator=g, dtype=F64)
    x0 = probability_flow_sample(score, MILD, x1, n_steps=100)
    log_q = imp.pf_ode_log_prob(score, MILD, x0, n_steps=100)
    assert float((log_q - _transported_log_q(x0, r, s, MILD)).abs().max()) < 1e-2


def test_pf_ode_hutchinson_is_unbiased():
    r, s = _rotated_gaussian(seed=2)
    g = torch.Generator().manual_seed(3)
    points = (torch.randn(4, 3, generator=g, dtype=F64) * s) @ r.T
    copies = 48
    x0 = points.repeat_interleave(copies, 0)
    exact = _transported_log_q(points, r, s, MILD)
    for probe in ("rademacher", "gaussian"):
        est = imp.pf_ode_log_prob(_gaussian_score(r, s, MILD), MILD, x0, n_steps=100, divergence="hutchinson",
                                  n_probes=2, probe=probe, generator=torch.Generator().manual_seed(5))
        est = est.reshape(4, copies)
        sd = est.std(1)
        assert bool((sd > 1e-3).all())  # the estimator is random (the Jacobian is not diagonal) ...
        se = sd / math.sqrt(copies)
        assert bool(((est.mean(1) - exact).abs() < 4 * se + 1e-2).all()), (probe, est.mean(1) - exact, se)


def test_pf_ode_in_the_centre_of_mass_free_subspace():
    # 4 particles in 2-D; target N(0, s0^2) on the 6-D COM-free subspace; the score given is
    # NOT projected (-x / (s0^2 + σ_t^2)), pf_ode_log_prob projects the drift itself
    n, d, s0 = 4, 2, 1.2
    d_eff = (n - 1) * d

    def project(v: Tensor) -> Tensor:
        return remove_com(v, n, d)

    def score_for(schedule: GeometricNoiseSchedule):
        return lambda x, t: -x / (s0**2 + schedule.variance(t)[:, None])

    def transported(x0: Tensor, schedule: GeometricNoiseSchedule, dims: int) -> Tensor:
        s1 = schedule.prior_std
        stretch = math.sqrt((s0**2 + s1**2) / s0**2)
        return (-0.5 * (stretch * x0).pow(2).sum(-1) / s1**2 - 0.5 * dims * math.log(2 * math.pi * s1**2)
                + dims * math.log(stretch))

    g = torch.Generator().manual_seed(6)
    x0 = project(s0 * torch.randn(16, n * d, generator=g, dtype=F64))
    exact = -0.5 * (x0**2).sum(-1) / s0**2 - 0.5 * d_eff * math.log(2 * math.pi * s0**2)
    # the exact subspace density, with the broad schedule
    log_q = imp.pf_ode_log_prob(score_for(SCHEDULE), SCHEDULE, x0, n_steps=400, project=project)
    assert float((log_q - exact).abs().max()) < 2e-2
    # the sampler's own density, with the mild schedule: exact divergence, Hutchinson, explicit d_eff
    score = score_for(MILD)
    log_q = imp.pf_ode_log_prob(score, MILD, x0, n_steps=100, project=project)
    assert float((log_q - transported(x0, MILD, d_eff)).abs().max()) < 1e-2
    hutch = imp.pf_ode_log_prob(score, MILD, x0.repeat(16, 1), n_steps=100, divergence="hutchinson", n_probes=2,
                                project=project, generator=torch.Generator().manual_seed(7)).reshape(16, 16)
    se = hutch.std(0) / 4
    assert bool(((hutch.mean(0) - transported(x0, MILD, d_eff)).abs() < 4 * se + 1e-2).all())
    assert imp.pf_ode_log_prob(score, MILD, x0, n_steps=100, project=project, effective_dim=6).allclose(log_q)
    # without the projection the 2 centre-of-mass directions are counted too: the result is the
    # 8-dimensional density, off by their share of prior and divergence
    full = imp.pf_ode_log_prob(score, MILD, x0, n_steps=100)
    assert float((full - transported(x0, MILD, n * d)).abs().max()) < 1e-2
    assert float((full - log_q).abs().min()) > 1.0
    with pytest.raises(imp.ImportanceInputError, match="effective_dim = 8 contradicts"):
        imp.pf_ode_log_prob(score, MILD, x0, n_steps=2, project=project, effective_dim=8)
    with pytest.raises(imp.ImportanceInputError, match="does not lie in the subspace"):
        imp.pf_ode_log_prob(score, MILD, x0 + 1.0, n_steps=2, project=project)


def test_pf_ode_rejects_bad_input():
    r, s = _rotated_gaussian()
    score = _gaussian_score(r, s)
    x0 = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(imp.ImportanceInputError, match="divergence must be"):
        imp.pf_ode_log_prob(score, SCHEDULE, x0, 4, divergence="trace")
    with pytest.raises(imp.ImportanceInputError, match="n_probes must be a positive int"):
        imp.pf_ode_log_prob(score, SCHEDULE, x0, 4, divergence="hutchinson", n_probes=0)
    with pytest.raises(imp.ImportanceInputError, match=r"x0: expected a floating tensor of shape \(B, dim\)"):
        imp.pf_ode_log_prob(score, SCHEDULE, torch.zeros(3, dtype=F64), 4)
    with pytest.raises(imp.ImportanceInputError, match="1 of 2 samples contain NaN"):
        imp.pf_ode_log_prob(score, SCHEDULE, torch.tensor([[0.0, 0.0, 0.0], [float("nan"), 0.0, 0.0]]), 4)
    with pytest.raises(imp.ImportanceInputError, match=r"returned shape \(2, 2\), expected \(2, 3\)"):
        imp.pf_ode_log_prob(lambda x, t: x[:, :2], SCHEDULE, x0, 4)
    with pytest.raises(imp.ImportanceInputError, match="diverged at step 1"):
        imp.pf_ode_log_prob(lambda x, t: x * float("nan"), SCHEDULE, x0, 4)
    with pytest.raises(imp.ImportanceInputError, match="n_steps"):
        imp.pf_ode_log_prob(score, SCHEDULE, x0, 0)
    with pytest.raises(imp.ImportanceInputError, match="GeometricNoiseSchedule"):
        imp.pf_ode_log_prob(score, None, x0, 4)


def test_importance_resample_reproduces_the_target_mean():
    # q = N(0, 2^2), p = N(1, 1) (unnormalised): resampled draws have mean 1 and variance 1
    g = torch.Generator().manual_seed(8)
    x = 2.0 * torch.randn(100_000, generator=g, dtype=F64)
    log_w = -0.5 * (x - 1.0) ** 2 + 0.5 * (x / 2.0) ** 2
    idx = imp.importance_resample(log_w, 20_000, generator=g)
    assert idx.dtype == torch.long and idx.shape == (20_000,)
    xr = x[idx]
    assert abs(float(xr.mean()) - 1.0) < 0.03 and abs(float(xr.var()) - 1.0) < 0.05
    # distinct draws are limited by the ESS of the weights
    tiny = torch.tensor([0.0, -50.0, -50.0, -50.0], dtype=F64)
    assert set(imp.importance_resample(tiny, 100, generator=g).tolist()) == {0}
    with pytest.raises(imp.ImportanceInputError, match="n must be a positive int"):
        imp.importance_resample(tiny, 0)


def test_log_z_three_ways_recovers_the_exact_log_z_of_a_gaussian_target():
    # q = N(0, I_3) is normalised; E(x) = |x|^2 / (2 s^2) at kT = 1 has Z = (2 pi s^2)^{3/2}
    d, s = 3, 1.3
    log_z = 0.5 * d * math.log(2 * math.pi * s**2)
    g = torch.Generator().manual_seed(3)
    x_q = torch.randn(4000, d, generator=g, dtype=F64)
    x_p = s * torch.randn(3000, d, generator=g, dtype=F64)

    def log_w(x):  # -E - log q
        return -x.pow(2).sum(1) / (2 * s**2) + x.pow(2).sum(1) / 2 + 0.5 * d * math.log(2 * math.pi)

    estimates = imp.log_z_three_ways(log_w(x_q), log_w(x_p))
    assert list(estimates) == ["FEP forward (sampler samples)", "FEP reverse (samples of p)", "BAR (both)"]
    for name, est in estimates.items():
        assert abs(-est.delta_f - log_z) < 4 * est.standard_error + 1e-3, (name, est, log_z)
        assert 0 < est.standard_error < 0.1
    # the forward estimate is exactly importance sampling's log Z-hat
    assert -estimates["FEP forward (sampler samples)"].delta_f == pytest.approx(imp.log_z_estimate(log_w(x_q))[0], abs=1e-12)
    with pytest.raises(imp.ImportanceInputError, match="log_w_at_p"):
        imp.log_z_three_ways(log_w(x_q), torch.tensor([0.0, float("nan")], dtype=F64))
