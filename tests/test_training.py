"""Tests of boltzlab.training: the exact double-well sampler against quadrature, the losses
against independent computations (torch.distributions, a linear-Gaussian model solved in
closed form, finite differences, BCE), and the loops for seeding and bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from boltzlab import models as Mo
from boltzlab import training as T
from boltzlab.energies import DoubleWell2D


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)




# ----------------------------------------------------------------------------- exact samples


@pytest.mark.parametrize("kT", [1.0, 2.5])
def test_double_well_samples_match_quadrature(kT):
    energy = DoubleWell2D(kT=kT)
    n = 100_000
    x = T.double_well_exact_samples(n, energy, generator=gen(1), dtype=torch.float64)
    assert x.shape == (n, 2) and x.dtype == torch.float64
    # deep-well mass against the energy's own quadrature, within 4 binomial standard errors
    p_left = energy.well_probabilities()[0]
    se = math.sqrt(p_left * (1 - p_left) / n)
    assert float((x[:, 0] < 0).double().mean()) == pytest.approx(p_left, abs=4 * se)
    # the x1 marginal against an independent CDF (adaptive quadrature, scipy), by
    # Kolmogorov-Smirnov on 2000 samples: the CDF at the sorted samples is accumulated
    # interval by interval
    def density(u: float) -> float:
        return math.exp(-(u**4 - 6 * u**2 + u) / kT)
    z = integrate.quad(density, -8, 8, points=[-1.8, 1.7])[0]
    v = np.sort(x[:2000, 0].numpy())
    steps = [integrate.quad(density, a, b)[0] for a, b in zip(np.concatenate([[-8.0], v[:-1]]), v)]
    cdf_at_v = np.cumsum(steps) / z
    ecdf_hi, ecdf_lo = np.arange(1, v.size + 1) / v.size, np.arange(v.size) / v.size
    ks = max(np.max(ecdf_hi - cdf_at_v), np.max(cdf_at_v - ecdf_lo))
    assert stats.kstwo.sf(ks, v.size) > 1e-3
    # x2 ~ N(0, kT)
    assert float(x[:, 1].mean()) == pytest.approx(0.0, abs=4 * math.sqrt(kT / n))
    assert float(x[:, 1].var()) == pytest.approx(kT, rel=0.02)


def test_double_well_samples_are_seeded_and_checked():
    a = T.double_well_exact_samples(100, generator=gen(3))
    assert torch.equal(a, T.double_well_exact_samples(100, generator=gen(3)))
    assert not torch.equal(a, T.double_well_exact_samples(100, generator=gen(4)))
    with pytest.raises(ValueError, match="positive integer"):
        T.double_well_exact_samples(0)
    with pytest.raises(TypeError, match="DoubleWell2D"):
        T.double_well_exact_samples(10, energy="dw")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- VAE losses


def test_kl_term_matches_torch_distributions():
    mu = torch.randn(6, 3, generator=gen(0), dtype=torch.float64) * 2
    log_var = torch.randn(6, 3, generator=gen(1), dtype=torch.float64)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * log_var)), Normal(torch.zeros_like(mu), torch.ones_like(mu)))
    torch.testing.assert_close(T.gaussian_kl_to_standard(mu, log_var), expected)
    assert float(T.gaussian_kl_to_standard(torch.zeros(1, 2), torch.zeros(1, 2)).abs().max()) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        T.gaussian_kl_to_standard(mu, log_var[:, :2])


def test_reparameterize_moments_and_pathwise_gradients():
    mu = torch.tensor([[1.0, -2.0]], requires_grad=True)
    log_var = torch.tensor([[0.5, -1.0]], requires_grad=True)
    eps = torch.randn(200_000, 2, generator=gen(2))
    z = T.reparameterize(mu.expand(200_000, 2), log_var.expand(200_000, 2), eps)
    torch.testing.assert_close(z.mean(0), mu[0].detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(z.var(0), log_var[0].detach().exp(), rtol=0.02, atol=0)
    # dz/dmu = 1 and dz/dlog_var = eps exp(log_var / 2) / 2, per sample
    z1 = T.reparameterize(mu, log_var, eps[:1])
    g_mu, g_lv = torch.autograd.grad(z1.sum(), (mu, log_var))
    torch.testing.assert_close(g_mu, torch.ones(1, 2))
    torch.testing.assert_close(g_lv, 0.5 * eps[:1] * torch.exp(0.5 * log_var.detach()))


class _Affine(torch.nn.Module):
    """u -> u A^T + c as an encoder head: mu = A u + c, log_var = constant."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor, log_var: torch.Tensor) -> None:
        super().__init__()
        self.a, self.c, self.log_var = a, c, log_var
        self.x_dim, self.z_dim = a.shape[1], a.shape[0]

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = u @ self.a.T + self.c
        return mu, self.log_var.expand_as(mu)


def _linear_gaussian_vae(loc: torch.Tensor, scale: torch.Tensor, sigma: float, mean_shift: float = 0.0):
    r"""p(z) = N(0, I_2), p(u | z) = N(W z + b, σ² I_3) with W^T W diagonal, x = loc + scale ⊙ u.

    Exact posterior: precision Λ = I + W^T W / σ² (diagonal), mean Λ^{-1} W^T (u - b) / σ².
    The encoder is that posterior (its mean shifted by ``mean_shift`` to make it inexact).
    Returns the VAE and the exact log p(x) as a function.
    """
    dt = torch.float64
    w = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.0, 1.5]], dtype=dt)
    w[:, 1] -= (w[:, 0] @ w[:, 1]) / (w[:, 0] @ w[:, 0]) * w[:, 0]  # orthogonal columns
    b = torch.tensor([0.3, -0.2, 1.0], dtype=dt)
    post_var = 1.0 / (1.0 + torch.diag(w.T @ w) / sigma**2)
    a = post_var[:, None] * w.T / sigma**2
    enc = _Affine(a, -a @ b + mean_shift, post_var.log())
    dec = Mo.GaussianDecoder(2, 3, hidden=()).double()
    with torch.no_grad():
        dec.net.net[0].weight.copy_(w)
        dec.net.net[0].bias.copy_(b)
        dec.log_var.fill_(2 * math.log(sigma))
    vae = Mo.VAE(enc, dec, Mo.Standardizer(loc, scale))  # type: ignore[arg-type]
    vae.standardizer.double()
    cov_x = torch.diag(scale.double()) @ (w @ w.T + sigma**2 * torch.eye(3, dtype=dt)) @ torch.diag(scale.double())
    marginal = MultivariateNormal(loc.double() + scale.double() * b, cov_x)

    def exact_kl_to_posterior(x: torch.Tensor) -> torch.Tensor:
        mu_q, lv_q = enc(vae.standardizer(x))
        return kl_divergence(Normal(mu_q, lv_q.mul(0.5).exp()), Normal(mu_q - mean_shift, lv_q.mul(0.5).exp())).sum(-1)

    return vae, marginal.log_prob, exact_kl_to_posterior


@pytest.mark.parametrize("mean_shift", [0.0, 0.7])
def test_elbo_of_linear_gaussian_vae_is_log_evidence_minus_posterior_kl(mean_shift):
    """log p(x) = ELBO + KL(q(z|x) || p(z|x)): equality when q is the exact posterior."""
    loc, scale = torch.tensor([5.0, -3.0, 0.0]), torch.tensor([2.0, 0.5, 10.0])
    vae, log_px, kl_post = _linear_gaussian_vae(loc, scale, sigma=0.8, mean_shift=mean_shift)
    x = loc + scale * torch.randn(4, 3, generator=gen(5), dtype=torch.float64)
    n_mc = 50_000
    xs = x.repeat_interleave(n_mc, 0)
    with torch.no_grad():
        terms = T.elbo(vae, xs, generator=gen(6))
        expected = log_px(x) - kl_post(x)
    per_x = terms.elbo.reshape(4, n_mc)
    mc_mean, mc_se = per_x.mean(1), per_x.std(1) / math.sqrt(n_mc)
    assert bool(((mc_mean - expected).abs() < 5 * mc_se + 1e-9).all()), (mc_mean, expected, mc_se)
    assert bool((mc_mean <= log_px(x) + 5 * mc_se).all())
    if mean_shift == 0.0:
        torch.testing.assert_close(mc_mean, log_px(x), atol=float(5 * mc_se.max()), rtol=0)
    else:
        assert bool((kl_post(x) > 0.1).all())  # the gap is real, not noise


def test_elbo_terms_and_beta_loss():
    vae = Mo.VAE.gaussian(2, 2, hidden=(8,), seed=0)
    x = torch.randn(5, 2, generator=gen(0))
    eps = torch.randn(5, 2, generator=gen(1))
    terms = T.elbo(vae, x, eps=eps)
    assert terms.reconstruction.shape == (5,) and terms.kl.shape == (5, 2)
    torch.testing.assert_close(terms.elbo, terms.reconstruction - terms.kl.sum(-1))
    torch.testing.assert_close(terms.loss(3.0), -(terms.reconstruction - 3.0 * terms.kl.sum(-1)).mean())
    # with a given eps the ELBO is a deterministic function
    torch.testing.assert_close(T.elbo(vae, x, eps=eps).elbo, terms.elbo)


# ----------------------------------------------------------------------------- GAN losses


def test_gan_losses_for_known_logits_match_bce():
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 4.0, 1.0])
    expected_d = bce(real, torch.ones(3)) + bce(fake, torch.zeros(4))
    torch.testing.assert_close(T.gan_discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(T.gan_generator_loss(fake), bce(fake, torch.ones(4)))
    # a discriminator that cannot tell (logit 0) gives 2 log 2 and log 2
    assert float(T.gan_discriminator_loss(torch.zeros(8), torch.zeros(8))) == pytest.approx(2 * math.log(2))
    assert float(T.gan_generator_loss(torch.zeros(8))) == pytest.approx(math.log(2))
    # a perfect discriminator: D loss -> 0; the non-saturating G loss still has slope -1
    assert float(T.gan_discriminator_loss(torch.full((4,), 30.0), torch.full((4,), -30.0))) < 1e-12
    fake_logit = torch.tensor([-30.0], requires_grad=True)
    (grad,) = torch.autograd.grad(T.gan_generator_loss(fake_logit), fake_logit)
    assert float(grad) == pytest.approx(-1.0, abs=1e-9)


def test_wgan_losses():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 0.0, 1.0])
    assert float(T.wgan_critic_loss(real, fake)) == pytest.approx(0.0 - 2.0)
    assert float(T.wgan_generator_loss(fake)) == pytest.approx(0.0)


def test_gradient_penalty_of_a_linear_critic_is_analytic_and_differentiable():
    w = torch.tensor([0.6, 2.0], requires_grad=True)
    real, fake = torch.randn(10, 2, generator=gen(0)), torch.randn(10, 2, generator=gen(1))
    gp = T.gradient_penalty(lambda x: x @ w, real, fake, generator=gen(2))
    norm = float(w.detach().norm())
    assert float(gp.detach()) == pytest.approx((norm - 1) ** 2, rel=1e-6)
    (grad_w,) = torch.autograd.grad(gp, w)  # needs create_graph=True inside
    torch.testing.assert_close(grad_w, 2 * (norm - 1) * w.detach() / norm)


def test_gradient_penalty_matches_finite_differences():
    critic = Mo.Critic(2, hidden=(16, 16), seed=0).double()
    real = torch.randn(12, 2, generator=gen(3), dtype=torch.float64)
    fake = torch.randn(12, 2, generator=gen(4), dtype=torch.float64) * 3
    t = torch.rand(12, 1, generator=gen(5), dtype=torch.float64)
    x_hat = t * real + (1 - t) * fake
    h = 1e-6
    grads = torch.stack([
        (critic(x_hat + h * e) - critic(x_hat - h * e)) / (2 * h) for e in torch.eye(2, dtype=torch.float64)
    ], dim=-1)
    expected = ((grads.norm(dim=-1) - 1) ** 2).mean()
    gp = T.gradient_penalty(critic, real, fake, t=t)
    assert float(gp.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    with pytest.raises(ValueError, match=r"t must have shape \(12, 1\)"):
        T.gradient_penalty(critic, real, fake, t=t[:, 0])


# ----------------------------------------------------------------------------- loops


def test_run_training_records_evaluates_and_stops_on_nan():
    calls = []
    history = T.run_training(lambda k: {"a": k, "b": 2 * k}, 7, progress=False,
                             evaluate=lambda: {"c": len(calls.append(0) or calls)}, eval_every=3)
    assert history["a"] == list(range(7)) and history.final("b", window=2) == 11.0
    assert history.eval_steps == [3, 6, 7] and history.evaluations["c"] == [1, 2, 3]
    with pytest.raises(KeyError, match="recorded: a, b"):
        history["loss"]
    with pytest.raises(ValueError, match="loss became non-finite at step 2"):
        T.run_training(lambda k: {"loss": float("nan") if k == 2 else 1.0}, 5, progress=False)


def _gaussian_data(n: int = 4000) -> torch.Tensor:
    return torch.randn(n, 2, generator=gen(0)) * torch.tensor([2.0, 0.5]) + torch.tensor([10.0, -4.0])


def test_training_is_reproducible_with_a_seed():
    data = _gaussian_data()

    def vae_run(seed: int) -> tuple[list[float], torch.Tensor]:
        vae = Mo.VAE.gaussian(2, 2, hidden=(16,), data=data, seed=0)
        h = T.train_vae(vae, data, 20, batch_size=64, seed=seed, progress=False)
        return h["loss"], vae.sample(5, gen(0))

    (la, sa), (lb, sb), (lc, _) = vae_run(1), vae_run(1), vae_run(2)
    assert la == lb and torch.equal(sa, sb) and la != lc

    def wgan_run(seed: int) -> list[float]:
        g, f = Mo.Generator(2, 2, (8,), data=data, seed=0), Mo.Critic(2, (8,), data=data, seed=1)
        return T.train_wgan(g, f, data, 3, batch_size=32, n_critic=2, seed=seed, progress=False)["w1"]

    assert wgan_run(5) == wgan_run(5) != wgan_run(6)


def test_vae_learns_a_gaussian_close_to_its_log_likelihood():
    data = _gaussian_data()
    vae = Mo.VAE.gaussian(2, 2, hidden=(32,), data=data, seed=0)
    history = T.train_vae(vae, data, 600, batch_size=256, lr=5e-3, seed=0, progress=False)
    # the exact average log-likelihood of N(m, diag(4, 0.25)) data is -log(2 pi e * 2 * 0.5)
    exact = -math.log(2 * math.pi * math.e * 2.0 * 0.5)
    assert history.final("elbo", 100) == pytest.approx(exact, abs=0.15)
    assert history.final("elbo", 100) < exact + 0.05  # a bound, up to minibatch noise


def test_gan_moves_the_generator_onto_the_data():
    data = _gaussian_data()
    g, d = Mo.Generator(2, 2, (32,), seed=0), Mo.Discriminator(2, (32,), data=data, seed=1)
    T.train_gan(g, d, data, 400, batch_size=128, lr=2e-3, seed=0, progress=False)
    with torch.no_grad():
        x = g.sample(2000, gen(1))
    torch.testing.assert_close(x.mean(0), torch.tensor([10.0, -4.0]), atol=0.8, rtol=0)


def test_latent_usage_of_ignoring_and_copying_encoders():
    x = torch.randn(1000, 2, generator=gen(0)) * torch.tensor([3.0, 1.0])
    vae = Mo.VAE(Mo.GaussianEncoder(2, 2, hidden=()), Mo.GaussianDecoder(2, 2))
    lin = vae.encoder.net.net[0]
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()  # q(z | x) = N(0, I) for every x: collapsed
    usage = T.latent_usage(vae, x)
    assert usage.active_units == 0 and usage.kl_total == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        lin.weight[:2] = torch.eye(2)  # mu = x, log_var = 0
    usage = T.latent_usage(vae, x)
    torch.testing.assert_close(usage.activity, x.var(0))
    torch.testing.assert_close(usage.kl_per_dim, 0.5 * (x**2).mean(0))
    assert usage.active_units == 2


def test_training_rejects_bad_data():
    vae = Mo.VAE.gaussian(2, 2, hidden=(4,))
    with pytest.raises(ValueError, match="NaN"):
        T.train_vae(vae, torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1, progress=False)
    with pytest.raises(ValueError, match=r"expected shape \(batch, 2\)"):
        T.train_vae(vae, torch.randn(10, 3), 1, progress=False)
