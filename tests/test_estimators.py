"""boltzlab.estimators against exact noised scores, autograd and the fused kernel."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab import estimators
from boltzlab.energies import DoubleWell2D, GaussianMixture, lj13
from boltzlab.estimators import (
    score_quality_by_dimension,
    clip_score,
    draw_eps,
    estimator_error,
    gmm_noised_score,
    jensen_score,
    lse_score,
    mc_score,
    naive_score,
    richardson_score,
)
from boltzlab.kernels import mc_score_estimate

F64 = torch.float64


def _noised_points(gmm: GaussianMixture, n: int, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(n, g, dtype=F64)
    return x0 + sigma * torch.randn(x0.shape, generator=g, dtype=F64)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 4.0])
def test_gmm_noised_score_matches_autograd(sigma):
    gmm = GaussianMixture()
    x = _noised_points(gmm, 32, max(sigma, 1.0), seed=1).requires_grad_(True)
    # independent route: the noised mixture's log-density, written out, differentiated by autograd
    v = gmm.std**2 + sigma**2
    sq = ((x[:, None, :] - gmm.means.to(F64)) ** 2).sum(-1)
    log_pt = torch.logsumexp(-sq / (2 * v), dim=-1) - math.log(2 * math.pi * v) - math.log(40)
    (grad,) = torch.autograd.grad(log_pt.sum(), x)
    torch.testing.assert_close(gmm_noised_score(gmm, x.detach(), sigma), grad, rtol=1e-10, atol=1e-12)


def test_gmm_noised_score_per_point_sigma_and_sigma_zero_is_the_score():
    gmm = GaussianMixture()
    x = _noised_points(gmm, 6, 1.0, seed=2)
    sig = torch.tensor([0.0, 0.1, 1.0, 2.0, 5.0, 9.0], dtype=F64)
    per_point = gmm_noised_score(gmm, x, sig)
    for i in range(6):
        torch.testing.assert_close(per_point[i:i + 1], gmm_noised_score(gmm, x[i:i + 1], float(sig[i])))
    torch.testing.assert_close(gmm_noised_score(gmm, x, 0.0), gmm.score(x))
    with pytest.raises(ValueError, match="kT"):
        gmm_noised_score(gmm.at_temperature(2.0), x, 1.0)


def test_lse_converges_like_one_over_k():
    gmm = GaussianMixture()
    sigma = 1.0
    x = _noised_points(gmm, 32, sigma, seed=3)
    exact = gmm_noised_score(gmm, x, sigma)
    g = torch.Generator().manual_seed(4)
    mse = {k: estimator_error(gmm, x, sigma, exact, k, 16, generator=g).mse for k in (4, 16, 64)}
    # variance-dominated regime: 4x the copies gives about 1/4 of the error
    assert mse[16] < mse[4] / 2.5 and mse[64] < mse[16] / 2.5
    assert mse[64] > mse[16] / 8  # and not faster than 1/K
    rel = estimator_error(gmm, x, sigma, exact, 256, 4, generator=g).relative_mse
    assert rel < 0.02


def test_jensen_converges_to_the_smoothed_log_density_gradient_not_the_noised_score():
    # single Gaussian N(0, s^2 I): Jensen -> -x/s^2, the noised score is -x/(s^2 + sigma^2)
    d, s, sigma = 3, 1.0, 1.0
    gauss = GaussianMixture(name="gauss", dim=d, means=torch.zeros(1, d), std=s)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(5), dtype=F64)
    eps = draw_eps(gauss, 5, 4096, torch.Generator().manual_seed(6), dtype=F64)
    torch.testing.assert_close(jensen_score(gauss, x, sigma, eps), -x / s**2, rtol=0, atol=0.1)
    torch.testing.assert_close(gmm_noised_score(gauss, x, sigma), -x / (s**2 + sigma**2))
    torch.testing.assert_close(lse_score(gauss, x, sigma, eps), -x / (s**2 + sigma**2), rtol=0, atol=0.1)


def test_naive_overflows_where_lse_stays_finite():
    cold = DoubleWell2D().at_temperature(0.05)  # E/kT about -216 near the deep minimum
    x = torch.tensor([[-1.7, 0.0], [-1.8, 0.1]])
    eps = draw_eps(cold, 2, 16, torch.Generator().manual_seed(7))
    naive = naive_score(cold, x, 0.05, eps)
    lse = lse_score(cold, x, 0.05, eps)
    assert not torch.isfinite(naive).any()
    assert torch.isfinite(lse).all()
    ref = lse_score(cold, x.double(), 0.05, eps.double())  # float64 keeps e^216
    torch.testing.assert_close(lse.double(), ref, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(naive_score(cold, x.double(), 0.05, eps.double()), ref)


def test_naive_underflows_far_from_the_modes():
    gmm = GaussianMixture()
    x = torch.tensor([[200.0, 200.0]])  # E about 1e4: every e^{-E} is 0 in float32
    eps = draw_eps(gmm, 1, 8, torch.Generator().manual_seed(8))
    assert torch.isnan(naive_score(gmm, x, 1.0, eps)).all()
    lse = lse_score(gmm, x, 1.0, eps)
    assert torch.isfinite(lse).all()
    # far away the nearest mode dominates; the score points back towards the mixture
    assert (lse < 0).all()


def test_clip_bounds_norms_and_keeps_directions():
    g = torch.Generator().manual_seed(9)
    v = 10 * torch.randn(20, 39, generator=g)
    clipped = clip_score(v, 5.0, n_particles=13, spatial_dim=3)
    parts, orig = clipped.reshape(20, 13, 3), v.reshape(20, 13, 3)
    assert (parts.norm(dim=-1) <= 5.0 + 1e-5).all()
    small = orig.norm(dim=-1) <= 5.0
    torch.testing.assert_close(parts[small], orig[small])
    cos = torch.nn.functional.cosine_similarity(parts, orig, dim=-1)
    torch.testing.assert_close(cos, torch.ones_like(cos))
    whole = clip_score(v, 5.0)
    torch.testing.assert_close(whole.norm(dim=-1), torch.full((20,), 5.0))
    assert torch.isfinite(clip_score(torch.zeros(2, 6), 1.0)).all()
    with pytest.raises(ValueError, match="max_norm"):
        clip_score(v, 0.0)
    with pytest.raises(ValueError, match="n_particles"):
        clip_score(v, 1.0, n_particles=4, spatial_dim=3)


def test_richardson_reduces_bias_on_gmm40():
    gmm = GaussianMixture()
    sigma, n_repeats = 3.0, 1500
    x = _noised_points(gmm, 8, sigma, seed=1)
    exact = gmm_noised_score(gmm, x, sigma)
    g = torch.Generator().manual_seed(10)
    plain = estimator_error(gmm, x, sigma, exact, 16, n_repeats, generator=g)  # 16 evaluations
    rich = estimator_error(gmm, x, sigma, exact, 8, n_repeats, richardson=True, generator=g)  # 2 * 8
    # bias2 carries variance/R of Monte Carlo noise; subtract it before comparing
    plain_bias2 = plain.bias2 - plain.variance / n_repeats
    rich_bias2 = rich.bias2 - rich.variance / n_repeats
    assert rich_bias2 < plain_bias2 / 2
    assert plain_bias2 > 5 * plain.variance / n_repeats  # the plain bias is resolved, not noise


def test_lse_agrees_with_the_fused_kernel_on_lj13():
    lj = lj13()
    g = torch.Generator().manual_seed(11)
    x = lj.remove_com(1.2 * torch.randn(4, lj.dim, generator=g, dtype=F64))
    eps = draw_eps(lj, 4, 40, torch.Generator().manual_seed(12), dtype=F64)
    ours = mc_score(lj, x, 0.05, eps=eps)
    kernel = mc_score_estimate(lj, x, 0.05, noise=eps, backend="reference").score
    torch.testing.assert_close(ours, kernel, rtol=1e-8, atol=1e-8)
    # the materialised path (as Richardson uses) gives the same weights and forces
    from boltzlab.estimators import copy_log_weights_and_forces

    log_w, f = copy_log_weights_and_forces(lj, x, torch.full((4,), 0.05, dtype=F64), eps)
    direct = (torch.softmax(log_w, 1)[..., None] * f).sum(1)
    torch.testing.assert_close(direct, kernel, rtol=1e-8, atol=1e-8)
    # same generator state, same noise as the kernel draws itself
    drawn = mc_score(lj, x, 0.05, 40, generator=torch.Generator().manual_seed(12))
    own = mc_score_estimate(lj, x, 0.05, 40, generator=torch.Generator().manual_seed(12), backend="reference").score
    torch.testing.assert_close(drawn, own, rtol=1e-8, atol=1e-8)
    # the copies stay centre-of-mass free, so the score does too
    torch.testing.assert_close(ours.reshape(4, 13, 3).sum(1), torch.zeros(4, 3, dtype=F64), rtol=0, atol=1e-8)


def test_estimators_agree_with_equal_energies_and_bad_input_is_named():
    gmm = GaussianMixture()
    x = _noised_points(gmm, 5, 1.0, seed=13)
    eps = draw_eps(gmm, 5, 1, torch.Generator().manual_seed(14), dtype=F64)
    # with one copy every estimator returns that copy's score
    one = gmm.score(x + eps[:, 0])
    for fn in (lse_score, naive_score, jensen_score):
        torch.testing.assert_close(fn(gmm, x, 1.0, eps), one)
    with pytest.raises(ValueError, match="even"):
        richardson_score(gmm, x, 1.0, draw_eps(gmm, 5, 3, dtype=F64))
    with pytest.raises(ValueError, match="estimator"):
        mc_score(gmm, x, 1.0, 4, estimator="mean")
    with pytest.raises(ValueError, match="n_samples"):
        mc_score(gmm, x, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        mc_score(gmm, x, -1.0, 4)
    with pytest.raises(ValueError, match="shape"):
        lse_score(gmm, x, 1.0, eps[:, :, :1])


def test_blended_estimator_targets_the_exact_score_with_far_less_variance_at_large_sigma():
    """The force form and the noise form share the weights and the limit; on GMM-40 (exact
    noised score) the blend has a much smaller error than the force form at sigma >> well
    width, and the same error as sigma -> 0 (where it is the force form)."""
    from boltzlab.estimators import blended_score, mc_score

    gmm = GaussianMixture()
    g = torch.Generator().manual_seed(3)
    x0 = gmm.sample(128, generator=g).double()
    for sigma, better in ((10.0, True), (0.05, False)):
        x_t = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        exact = gmm_noised_score(gmm, x_t, sigma)
        lse = mc_score(gmm, x_t, sigma, 256, generator=g)
        blend = mc_score(gmm, x_t, sigma, 256, generator=g, estimator="blended", local_scale=gmm.std)
        err_lse = float((lse - exact).pow(2).sum(-1).mean())
        err_blend = float((blend - exact).pow(2).sum(-1).mean())
        if better:
            assert err_blend < 0.2 * err_lse, (err_blend, err_lse)
        else:
            assert err_blend == pytest.approx(err_lse, rel=0.5, abs=1e-3)
    # with many copies the blend converges to the exact score
    x_t = x0[:16] + 3.0 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 50_000, 2, generator=g, dtype=torch.float64)
    big = blended_score(gmm, x_t, 3.0, eps, local_scale=gmm.std)
    torch.testing.assert_close(big, gmm_noised_score(gmm, x_t, 3.0), rtol=0.0, atol=0.05)
    with pytest.raises(ValueError, match="needs local_scale"):
        mc_score(gmm, x_t, 1.0, 8, estimator="blended")


def test_score_quality_by_dimension_against_the_exact_gaussian_score() -> None:
    """On N(0, I_d) the Jensen estimate is -(x_t + sigma mean_k eps_k), i.e. (1 + sigma^2) times the
    exact score plus noise of order 1/sqrt(K); the LSE estimate points the right way in 2-D and
    loses direction (ESS -> 1) in 1000-D. Chunking the noise over points (needed at d = 10^4)
    leaves the statistics alone."""
    low = score_quality_by_dimension(2, 200, 256, generator=torch.Generator().manual_seed(0))
    assert low["cos_lse"] > 0.95 and low["ess"] > 50
    assert abs(low["ratio_jensen"] - 2.0) < 0.1 and abs(low["ratio_lse"] - 1.0) < 0.05
    high = score_quality_by_dimension(1000, 16, 256, generator=torch.Generator().manual_seed(0))
    assert high["ess"] < 2.0 and high["cos_lse"] < 0.9
    assert abs(high["ratio_jensen"] - 2.0) < 0.05
    whole = score_quality_by_dimension(50, 64, 64, generator=torch.Generator().manual_seed(1))
    chunked = score_quality_by_dimension(50, 64, 64, generator=torch.Generator().manual_seed(1),
                                         max_noise_elements=64 * 50 * 5)  # 5 points per chunk
    for key in whole:  # within the sampling error of a mean over 64 points
        assert abs(whole[key] - chunked[key]) < 0.05 * max(1.0, abs(whole[key])), key
    with pytest.raises(ValueError, match="need dim, n_points, n_samples >= 1"):
        score_quality_by_dimension(0, 4, 4)


@pytest.mark.parametrize("estimator", ["naive", "jensen"])
def test_copy_chunking_does_not_change_the_estimate(monkeypatch, estimator):
    # the materialising estimators ("lse" and "blended" stream instead) evaluate copies in
    # chunks of points (_MAX_COPY_ELEMENTS); a point's estimate must not
    # depend on how its neighbours were grouped, down to the last bit
    gmm = GaussianMixture()
    x = gmm.sample(37, torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = draw_eps(gmm, 37, 64, torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for cap in (1 << 22, 128 * 3, 1):  # everything at once; 3 points per chunk; one point per chunk
        monkeypatch.setattr(estimators, "_MAX_COPY_ELEMENTS", cap)
        results.append(mc_score(gmm, x, 1.0, eps=eps, estimator=estimator))
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("target", ["dw4", "lj13"])
def test_fused_training_target_equals_the_materialised_one(target: str) -> None:
    """The blended, clipped iDEM target from one streamed pass (force form and noise form
    folded together) against the materialised computation it replaced (kept as the
    benchmarks' baseline), on the same noise, in float32 and float64; and drawing the noise
    from a generator inside the pass gives the numbers draw_eps gives."""
    from boltzlab.energies import get_target
    from boltzlab.estimators import blended_score
    from boltzlab.kernels.benchmark import materialised_blended_score, materialised_mc_score

    energy = get_target(target)
    g = torch.Generator().manual_seed(40)
    for dtype, rel in ((F64, 1e-10), (torch.float32, 2e-4)):
        x = energy.remove_com(torch.randn(9, energy.dim, generator=g, dtype=F64)).to(dtype)
        sigma = torch.logspace(-2, 0.3, 9, dtype=dtype)
        eps = draw_eps(energy, 9, 130, torch.Generator().manual_seed(41), dtype=dtype)
        fused = blended_score(energy, x, sigma, eps, local_scale=0.1)
        old = materialised_blended_score(energy, x, sigma, eps, local_scale=0.1)
        scale = old.abs().amax(1, keepdim=True).clamp_min(1.0)
        assert ((fused - old).abs() <= rel * scale).all(), (fused - old).abs().max()
    # generator noise, clipping and float32: mc_score as the training loop calls it
    x = energy.remove_com(torch.randn(6, energy.dim, generator=g))
    kwargs = {"estimator": "blended", "local_scale": 0.1, "max_norm": 20.0}
    new = mc_score(energy, x, 0.5, 100, generator=torch.Generator().manual_seed(42), **kwargs)
    old = materialised_mc_score(energy, x, 0.5, 100, generator=torch.Generator().manual_seed(42), **kwargs)
    torch.testing.assert_close(new, old, rtol=2e-4, atol=2e-4)
    assert new.reshape(6, energy.n_particles, -1).norm(dim=-1).max() <= 20.0 * (1 + 1e-5)


def test_mc_score_streams_generator_noise_exactly_like_draw_eps() -> None:
    """mc_score with a generator never holds the K copies; it must see the same noise as with
    the eps that draw_eps draws from the same state, and leave the generator in the same state."""
    lj = lj13()
    x = lj.remove_com(torch.randn(5, lj.dim, generator=torch.Generator().manual_seed(43), dtype=F64))
    for estimator, extra in (("lse", {}), ("blended", {"local_scale": 0.07})):
        g_stream, g_eps = torch.Generator().manual_seed(44), torch.Generator().manual_seed(44)
        streamed = mc_score(lj, x, 0.3, 150, generator=g_stream, estimator=estimator, **extra)
        eps = draw_eps(lj, 5, 150, g_eps, dtype=F64)
        explicit = mc_score(lj, x, 0.3, eps=eps, estimator=estimator, **extra)
        torch.testing.assert_close(streamed, explicit, rtol=1e-12, atol=1e-12)
        assert torch.equal(g_stream.get_state(), g_eps.get_state())


def test_clip_with_one_threshold_per_point_equals_clipping_each_point_alone():
    g = torch.Generator().manual_seed(19)
    v = 30 * torch.randn(6, 39, generator=g)
    thresholds = torch.tensor([1.0, 5.0, 20.0, 50.0, 200.0, 1e4])
    clipped = clip_score(v, thresholds, n_particles=13, spatial_dim=3)
    for row, limit in enumerate(thresholds.tolist()):
        torch.testing.assert_close(clipped[row], clip_score(v[row:row + 1], limit, n_particles=13, spatial_dim=3)[0])
    torch.testing.assert_close(clipped[-1], v[-1])  # a threshold above every norm changes nothing
    with pytest.raises(ValueError, match="shape"):
        clip_score(v, thresholds[:3])
    with pytest.raises(ValueError, match="positive"):
        clip_score(v, torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, float("nan")]))


def test_shifted_proposal_keeps_the_limit_and_a_good_shift_lowers_the_error():
    """Copies drawn around x_t + delta and reweighted: with K = 20,000 the estimate is the exact
    noised GMM-40 score for any shift; delta = 0 is lse_score; the posterior-mean shift
    sigma^2 grad log p_t beats no shift, and a random shift is worse (but still consistent)."""
    gmm, sigma = GaussianMixture(), 3.0
    x = _noised_points(gmm, 64, sigma, seed=4)
    sig = torch.full((64,), sigma, dtype=F64)
    exact = gmm_noised_score(gmm, x, sig)
    eps = draw_eps(gmm, 64, 20_000, torch.Generator().manual_seed(5), dtype=F64)

    def median_error(shift: torch.Tensor) -> float:
        est = estimators.shifted_lse_score(gmm, x, sig, shift, eps)
        return float(((est - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-3)).median())

    torch.testing.assert_close(estimators.shifted_lse_score(gmm, x, sig, torch.zeros_like(x), eps),
                               lse_score(gmm, x, sig, eps))
    plain, good = median_error(torch.zeros_like(x)), median_error(sigma**2 * exact)
    bad = median_error(3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=F64))
    assert good < 0.7 * plain and plain < bad < 0.2
    with pytest.raises(ValueError, match="shift must have the shape"):
        estimators.shifted_lse_score(gmm, x, sig, x[:, :1], eps)
    with pytest.raises(ValueError, match="NaN or infinite"):
        estimators.shifted_lse_score(gmm, x, sig, torch.full_like(x, math.nan), eps)


def test_shifted_proposal_on_lj13_uses_the_pair_kernel_and_matches_lse_at_zero_shift():
    lj = lj13()
    g = torch.Generator().manual_seed(7)
    x = lj.remove_com(0.7 * torch.randn(40, lj.dim, generator=g, dtype=F64))
    sig = torch.full((40,), 0.1, dtype=F64)
    eps = draw_eps(lj, 40, 500, g, dtype=F64)
    torch.testing.assert_close(estimators.shifted_lse_score(lj, x, sig, torch.zeros_like(x), eps),
                               lse_score(lj, x, sig, eps), rtol=1e-7, atol=1e-6)
