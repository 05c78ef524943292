"""Tests of boltzlab.models: shapes, seeding, densities against torch.distributions and
quadrature, the standardiser's Jacobian against autograd, clear errors for bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal

from boltzlab import models as Mo


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)




# ----------------------------------------------------------------------------- MLP


def test_mlp_shapes_and_depth():
    net = Mo.MLP(3, 5, hidden=(16, 8))
    assert net(torch.randn(7, 3)).shape == (7, 5)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 16), (16, 8), (8, 5)]
    linear = Mo.MLP(3, 2, hidden=())
    x = torch.randn(4, 3)
    w, b = linear.net[0].weight, linear.net[0].bias
    torch.testing.assert_close(linear(x), x @ w.T + b)


def test_seed_gives_identical_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = Mo.MLP(2, 2, seed=7)
    b = Mo.MLP(2, 2, seed=7)
    c = Mo.MLP(2, 2, seed=8)
    assert torch.equal(torch.rand(3), expected_next)  # the global stream did not move
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    va, vb = Mo.VAE.gaussian(2, 2, seed=3), Mo.VAE.gaussian(2, 2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(va.parameters(), vb.parameters()))


@pytest.mark.parametrize("bad, match", [
    (torch.randn(4, 3), r"expected shape \(batch, 2\), got \(4, 3\)"),
    (torch.randn(2), r"expected shape \(batch, 2\), got \(2,\)"),
    (torch.ones(4, 2, dtype=torch.long), "floating"),
    ([[0.0, 1.0]], "torch.Tensor"),
])
def test_bad_input_is_a_clear_error(bad, match):
    with pytest.raises(Mo.ModelInputError, match=match):
        Mo.MLP(2, 1)(bad)


def test_bad_construction_arguments():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        Mo.MLP(2, 2, activation="gelu")
    with pytest.raises(ValueError, match="hidden\\[1\\] must be a positive integer"):
        Mo.MLP(2, 2, hidden=(4, 0))
    with pytest.raises(ValueError, match="encoder maps x_dim=2 to z_dim=3"):
        Mo.VAE(Mo.GaussianEncoder(2, 3), Mo.GaussianDecoder(2, 2))
    with pytest.raises(ValueError, match="n must be a positive integer"):
        Mo.VAE.gaussian(2, 2).sample(0)


# ----------------------------------------------------------------------------- standardiser


def test_standardizer_fit_inverse_and_log_det_against_autograd():
    x = torch.randn(500, 2, generator=gen(1), dtype=torch.float64) * torch.tensor([20.0, 0.5]) + torch.tensor([3.0, -1.0])
    st = Mo.Standardizer.fit(x)
    u = st(x)
    torch.testing.assert_close(u.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(u.std(0), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(st.inverse(u), x, atol=1e-4, rtol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: st(v[None])[0], x[0])
    assert float(st.log_det) == pytest.approx(float(torch.linalg.slogdet(jac).logabsdet), abs=1e-6)


def test_standardizer_rejects_constant_or_nonfinite_data():
    with pytest.raises(Mo.ModelInputError, match="constant"):
        Mo.Standardizer.fit(torch.tensor([[1.0, 2.0], [1.0, 3.0]]))
    with pytest.raises(Mo.ModelInputError, match="NaN"):
        Mo.Standardizer.fit(torch.tensor([[1.0, float("nan")], [1.0, 3.0]]))
    with pytest.raises(ValueError, match="positive"):
        Mo.Standardizer(torch.zeros(2), torch.tensor([1.0, 0.0]))


# ----------------------------------------------------------------------------- VAE parts


def test_encoder_decoder_shapes():
    enc, dec = Mo.GaussianEncoder(3, 2), Mo.GaussianDecoder(2, 3)
    mu, log_var = enc(torch.randn(5, 3))
    assert mu.shape == log_var.shape == (5, 2)
    mean, dec_log_var = dec(mu)
    assert mean.shape == dec_log_var.shape == (5, 3)
    assert dec.log_prob(torch.randn(5, 3), mu).shape == (5,)
    assert dec.sample(mu, gen()).shape == (5, 3)


def test_gaussian_decoder_log_prob_matches_torch_normal():
    dec = Mo.GaussianDecoder(2, 3, seed=0)
    with torch.no_grad():
        dec.log_var.copy_(torch.tensor([-1.0, 0.3, 0.8]))
    z, x = torch.randn(6, 2, generator=gen(1)), torch.randn(6, 3, generator=gen(2))
    mean, log_var = dec(z)
    expected = Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1)
    torch.testing.assert_close(dec.log_prob(x, z), expected)


def test_gaussian_decoder_samples_have_the_decoder_variance():
    dec = Mo.GaussianDecoder(1, 2, seed=0)
    with torch.no_grad():
        dec.log_var.copy_(torch.tensor([math.log(0.25), math.log(4.0)]))
    z = torch.zeros(40_000, 1)
    x = dec.sample(z, gen(3))
    mean = dec.sample(z[:1], noise=False)
    torch.testing.assert_close(x.mean(0), mean[0], atol=0.03, rtol=0)
    torch.testing.assert_close(x.var(0), torch.tensor([0.25, 4.0]), rtol=0.03, atol=0)


def _brute_force_ar_log_prob(dec: Mo.AutoregressiveMixtureDecoder, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(dec.x_dim):
        log_pi, means, log_std = dec._mixture(i, z, x[:, :i])
        mix = MixtureSameFamily(Categorical(logits=log_pi), Normal(means, log_std.exp()))
        total = total + mix.log_prob(x[:, i])
    return total


def test_autoregressive_decoder_log_prob_matches_torch_mixtures():
    dec = Mo.AutoregressiveMixtureDecoder(2, 2, n_components=4, seed=0)
    z, x = torch.randn(8, 2, generator=gen(1)), torch.randn(8, 2, generator=gen(2))
    torch.testing.assert_close(dec.log_prob(x, z), _brute_force_ar_log_prob(dec, x, z))


def test_autoregressive_decoder_is_normalised_and_autoregressive():
    dec = Mo.AutoregressiveMixtureDecoder(1, 2, n_components=3, hidden=(16,), seed=4).double()
    z = torch.tensor([[0.7]], dtype=torch.float64)
    # ∫∫ p(x1, x2 | z) dx1 dx2 = 1 on a grid wide enough for these untrained widths
    grid = torch.linspace(-12, 12, 601, dtype=torch.float64)
    x1, x2 = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([x1.reshape(-1), x2.reshape(-1)], -1)
    with torch.no_grad():
        p = dec.log_prob(pts, z.expand(pts.shape[0], 1)).exp()
    cell = float(grid[1] - grid[0]) ** 2
    assert float(p.sum()) * cell == pytest.approx(1.0, abs=2e-3)
    # the first conditional sees only z: changing x2 leaves it unchanged
    assert dec.conditionals[0].in_dim == 1 and dec.conditionals[1].in_dim == 2


def test_autoregressive_decoder_samples_follow_its_density():
    dec = Mo.AutoregressiveMixtureDecoder(1, 2, n_components=3, hidden=(16,), seed=4)
    z = torch.full((60_000, 1), 0.7)
    with torch.no_grad():
        x = dec.sample(z, gen(5))
        # E[x1] by quadrature of the first conditional
        log_pi, means, log_std = dec._mixture(0, z[:1], x[:1, :0])
    expected_mean_x1 = float((log_pi.exp() * means).sum())
    expected_var_x1 = float((log_pi.exp() * (means**2 + (2 * log_std).exp())).sum()) - expected_mean_x1**2
    se = math.sqrt(expected_var_x1 / z.shape[0])
    assert float(x[:, 0].mean()) == pytest.approx(expected_mean_x1, abs=5 * se)
    assert float(x[:, 0].var()) == pytest.approx(expected_var_x1, rel=0.05)


def test_vae_sample_shapes_units_and_reproducibility():
    data = torch.randn(200, 2, generator=gen(0)) * 30 + 100
    vae = Mo.VAE.gaussian(2, 3, data=data, seed=0)
    a, b = vae.sample(50, gen(1)), vae.sample(50, gen(1))
    assert a.shape == (50, 2) and torch.equal(a, b)
    assert not torch.equal(a, vae.sample(50, gen(2)))
    assert float(a.mean()) > 50  # decoded back to data units
    mu, log_var = vae.encode(data[:4])
    assert mu.shape == log_var.shape == (4, 3)
    ar = Mo.VAE.autoregressive(2, 1, data=data, n_components=3, seed=0)
    assert ar.sample(10, gen(1)).shape == (10, 2)


# ----------------------------------------------------------------------------- GAN parts


def test_gan_networks_shapes_and_seeded_samples():
    data = torch.randn(100, 2, generator=gen(0)) * 5
    g = Mo.Generator(3, 2, data=data, seed=0)
    d, f = Mo.Discriminator(2, data=data, seed=1), Mo.Critic(2, hidden=(8,), seed=2)
    x = g.sample(16, gen(4))
    assert x.shape == (16, 2) and x.requires_grad
    assert torch.equal(x, g.sample(16, gen(4)))
    assert d(x).shape == (16,) and f(x).shape == (16,)
    with pytest.raises(Mo.ModelInputError, match=r"z: expected shape \(batch, 3\)"):
        g(torch.randn(4, 2))


def test_critic_is_about_as_lipschitz_in_data_units_as_its_network_in_standard_units():
    # f(x) = s m((x - loc)/scale) with isotropic scale s: ∇_x f(x) = ∇_u m(u) exactly
    data = torch.randn(500, 2, generator=gen(0), dtype=torch.float64) * 25.0 + 3.0
    critic = Mo.Critic(2, hidden=(8,), data=data, seed=0).double()
    critic.standardizer.scale.fill_(25.0)
    critic.output_scale.fill_(25.0)
    x = data[:6].clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(critic(x).sum(), x)
    u = critic.standardizer(data[:6]).requires_grad_(True)
    (grad_u,) = torch.autograd.grad(critic.net(u).sum(), u)
    torch.testing.assert_close(grad_x, grad_u)
