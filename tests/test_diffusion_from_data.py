"""Chapter 04's package pieces: the DSM loss on given noise, one reverse-SDE step, Tweedie's
formula, the exact noised mixture and its posterior mean, and the noised-score widget. Each is
checked against something independent: closed forms for Gaussian data, brute-force quadrature,
autograd, or the sampler it is a piece of."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab.diffusion import (
    DiffusionInputError,
    GeometricNoiseSchedule,
    denoising_score_matching_loss,
    dsm_loss,
    perturb,
    reverse_sde_sample,
    reverse_sde_step,
    sample_times,
    tweedie_denoise,
)
from boltzlab.energies import GaussianMixture
from boltzlab.estimators import gmm_noised_score, gmm_posterior_mean, noised_mixture
from boltzlab.widgets import noised_score_view, noised_score_widget

F64 = torch.float64
SCHED = GeometricNoiseSchedule(0.01, 10.0)


def _small_mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.5]])
    return GaussianMixture(name="three", dim=2, means=means, std=0.7)


def _gaussian_score(s2: float):
    """Exact score of p_t = N(0, (s^2 + sigma_t^2) I) for data N(0, s^2 I)."""
    return lambda x, t: -x / (s2 + SCHED.variance(t))[:, None]


def test_dsm_loss_reproduces_the_sampled_loss_bit_for_bit():
    """denoising_score_matching_loss now delegates to dsm_loss: same draws, same number as the
    original perturb-based computation."""
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    score = _gaussian_score(1.0)
    g = torch.Generator().manual_seed(7)
    t = sample_times(64, generator=g, t_min=1e-3)
    x_t, eps = perturb(x0, t, SCHED, generator=g)
    original = (SCHED.std(t)[:, None] * score(x_t, t) + eps).pow(2).sum(-1).mean()
    now = denoising_score_matching_loss(score, x0, SCHED, generator=torch.Generator().manual_seed(7))
    assert torch.equal(now, original)


@pytest.mark.parametrize("sigma", [0.3, 2.0])
def test_dsm_loss_of_linear_scores_matches_the_closed_form(sigma):
    """Data N(0, s^2 I_d), score s(x) = -c x at a fixed sigma:
    E || sigma s(x_0 + sigma eps) + eps ||^2 = d [c^2 sigma^2 (s^2 + sigma^2) - 2 c sigma^2 + 1],
    minimised at c = 1 / (s^2 + sigma^2), the exact noised score, where it is d s^2 / (s^2 + sigma^2)."""
    d, s2, n = 2, 1.5, 400_000
    g = torch.Generator().manual_seed(3)
    x0 = math.sqrt(s2) * torch.randn(n, d, generator=g, dtype=F64)
    eps = torch.randn(n, d, generator=g, dtype=F64)
    t = SCHED.time_at_std(torch.full((n,), sigma, dtype=F64))
    c_star = 1.0 / (s2 + sigma**2)
    for c in (0.5 * c_star, c_star, 2.0 * c_star):
        got = float(dsm_loss(lambda x, tt, c=c: -c * x, x0, t, eps, SCHED))
        closed = d * (c**2 * sigma**2 * (s2 + sigma**2) - 2 * c * sigma**2 + 1)
        assert got == pytest.approx(closed, rel=0.01), (c, got, closed)
    assert d * s2 / (s2 + sigma**2) == pytest.approx(d * (c_star**2 * sigma**2 * (s2 + sigma**2)
                                                           - 2 * c_star * sigma**2 + 1))


def test_dsm_loss_names_bad_shapes():
    x0 = torch.zeros(4, 2)
    with pytest.raises(DiffusionInputError, match="t must have shape \\(4,\\)"):
        dsm_loss(_gaussian_score(1.0), x0, torch.zeros(3), torch.zeros(4, 2), SCHED)
    with pytest.raises(DiffusionInputError, match="eps must have the shape of x0"):
        dsm_loss(_gaussian_score(1.0), x0, torch.zeros(4), torch.zeros(4, 3), SCHED)


def test_reverse_sde_step_is_one_euler_step_of_the_sampler():
    x1 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * SCHED.prior_std
    score = _gaussian_score(1.0)
    t_end = 0.75
    sampled = reverse_sde_sample(score, SCHED, x1, 1, generator=torch.Generator().manual_seed(5), t_end=t_end)
    z = torch.randn(x1.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    stepped = reverse_sde_step(score, SCHED, x1, 1.0, 1.0 - t_end, z)
    torch.testing.assert_close(stepped, sampled, rtol=0, atol=1e-12)


def test_reverse_sde_step_by_hand_and_bad_input():
    x = torch.tensor([[1.0, -2.0]], dtype=F64)
    z = torch.tensor([[0.5, 0.25]], dtype=F64)
    t, dt = 0.6, 0.1
    g2 = 2 * SCHED.log_ratio * SCHED.sigma_min**2 * math.exp(2 * SCHED.log_ratio * t)
    s = -x / (1.0 + SCHED.sigma_min**2 * math.expm1(2 * SCHED.log_ratio * t))
    expected = x + g2 * s * dt + math.sqrt(g2 * dt) * z
    torch.testing.assert_close(reverse_sde_step(_gaussian_score(1.0), SCHED, x, t, dt, z), expected)
    with pytest.raises(DiffusionInputError, match="0 < dt <= t"):
        reverse_sde_step(_gaussian_score(1.0), SCHED, x, 0.1, 0.2, z)
    with pytest.raises(DiffusionInputError, match="z must have the shape of x"):
        reverse_sde_step(_gaussian_score(1.0), SCHED, x, 0.5, 0.1, torch.zeros(2, 2, dtype=F64))


def test_time_at_std_inverts_std():
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(SCHED.time_at_std(SCHED.std(t)), t)
    with pytest.raises(DiffusionInputError, match=">= 0"):
        SCHED.time_at_std(torch.tensor([-1.0]))


def _quadrature_grid(lo: float, hi: float, n: int) -> tuple[torch.Tensor, float]:
    u = torch.linspace(lo, hi, n, dtype=F64)
    gx, gy = torch.meshgrid(u, u, indexing="xy")
    return torch.stack([gx.flatten(), gy.flatten()], -1), float(u[1] - u[0]) ** 2


def test_noised_mixture_is_the_convolution_by_quadrature():
    gmm, sigma = _small_mixture(), 0.9
    x0, area = _quadrature_grid(-9.0, 9.0, 361)
    p0 = gmm.log_prob(x0).exp()
    x = torch.tensor([[0.0, 0.0], [-2.0, 0.5], [3.0, -3.0]], dtype=F64)
    kernel = torch.exp(-((x[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)) / (2 * math.pi * sigma**2)
    by_quadrature = (kernel * p0[None]).sum(-1) * area
    torch.testing.assert_close(noised_mixture(gmm, sigma).log_prob(x).exp(), by_quadrature, rtol=1e-6, atol=1e-10)


def test_gmm_noised_score_is_the_gradient_of_the_noised_log_density():
    gmm, sigma = _small_mixture(), 1.3
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2), dtype=F64).mul(3).requires_grad_(True)
    (grad,) = torch.autograd.grad(noised_mixture(gmm, sigma).log_prob(x).sum(), x)
    torch.testing.assert_close(gmm_noised_score(gmm, x.detach(), sigma), grad)


@pytest.mark.parametrize("sigma", [0.4, 2.5])
def test_posterior_mean_by_quadrature_and_tweedie(sigma):
    """E[x_0 | x_t] from Bayes on a grid equals gmm_posterior_mean, and Tweedie's formula with the
    exact noised score gives the same vector."""
    gmm = _small_mixture()
    x0, _ = _quadrature_grid(-10.0, 10.0, 401)
    log_prior = gmm.log_prob(x0)
    x_t = torch.tensor([[0.3, -0.4], [-2.5, 1.0], [4.0, 4.0]], dtype=F64)
    log_post = log_prior[None] - ((x_t[:, None, :] - x0[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(log_post, dim=-1)
    by_quadrature = w @ x0
    exact = gmm_posterior_mean(gmm, x_t, sigma)
    torch.testing.assert_close(exact, by_quadrature, rtol=1e-6, atol=1e-8)
    tweedie = tweedie_denoise(x_t, gmm_noised_score(gmm, x_t, sigma), sigma)
    torch.testing.assert_close(tweedie, exact, rtol=1e-10, atol=1e-10)


def test_tweedie_names_bad_input():
    with pytest.raises(DiffusionInputError, match="score_value must have the shape"):
        tweedie_denoise(torch.zeros(3, 2), torch.zeros(3, 1), 1.0)
    with pytest.raises(DiffusionInputError, match="sigma must be"):
        tweedie_denoise(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([1.0, -1.0, 1.0]))


def test_noised_mixture_rejects_other_targets():
    with pytest.raises(ValueError, match="kT = 1"):
        noised_mixture(GaussianMixture().at_temperature(2.0), 1.0)
    with pytest.raises(ValueError, match="sigma must be finite"):
        noised_mixture(GaussianMixture(), -1.0)


def test_noised_score_view_against_exact_and_zero_models():
    gmm = GaussianMixture()
    sched = GeometricNoiseSchedule(0.01, 70.0)
    exact_model = lambda x, t: gmm_noised_score(gmm, x, sched.std(t))
    view = noised_score_view(gmm, 3.0, exact_model, sched, grid=40, arrows=6)
    assert view.relative_error == pytest.approx(0.0, abs=1e-10)
    zero = noised_score_view(gmm, 3.0, lambda x, t: torch.zeros_like(x), sched, grid=40, arrows=6)
    assert zero.relative_error == pytest.approx(1.0)
    assert view.points.shape == (36, 2) and view.density.shape == (40, 40)
    # the density on the window is p_sigma: with the window holding nearly all mass it sums to ~1
    cell = float((view.xs[1] - view.xs[0]) * (view.ys[1] - view.ys[0]))
    assert float(view.density.sum()) * cell == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="needs its schedule"):
        noised_score_view(gmm, 3.0, exact_model)


def test_noised_score_widget_redraws_on_the_log_slider():
    w = noised_score_widget(sigma=1.0, grid=30, arrows=5)
    first = w.image.value
    assert w.state.sigma == pytest.approx(1.0) and w.state.model_score is None and first[:4] == b"\x89PNG"
    w.controls["sigma"].value = 30.0
    assert w.state.sigma == pytest.approx(30.0) and w.image.value != first
    # at sigma = 30 the 40 modes have merged: the exact score at the arrows points toward the middle
    gmm_mean = GaussianMixture().means.double().mean(0)
    outward = ((w.state.points - gmm_mean) * w.state.exact_score).sum(-1)
    assert bool((outward < 0).all())
    with pytest.raises(ValueError, match="outside sigma_range"):
        noised_score_widget(sigma=1000.0)
