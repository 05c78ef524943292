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


# ----------------------------------------------------------------------------- score networks


def _random_orthogonal(d: int, seed: int, reflect: bool) -> torch.Tensor:
    """A Haar-ish orthogonal matrix (QR of a Gaussian), with det -1 when ``reflect``."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q


def test_time_embedding_is_sin_cos_at_geometric_frequencies():
    emb = Mo.SinusoidalTimeEmbedding(8, max_period=100.0)
    t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    w = torch.tensor([100.0 ** (1 - k / 4) for k in range(4)], dtype=torch.float64)
    expected = torch.cat([torch.sin(t[:, None] * w), torch.cos(t[:, None] * w)], -1)
    torch.testing.assert_close(emb(t), expected)
    freqs = emb.frequencies()
    ratios = freqs[:-1] / freqs[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 100.0 ** 0.25))
    with pytest.raises(Mo.ModelInputError, match="even"):
        Mo.SinusoidalTimeEmbedding(7)


def test_score_mlp_shapes_time_dependence_seed_and_projection():
    from boltzlab.energies import remove_com

    net = Mo.ScoreMLP(8, hidden=32, n_layers=2, time_dim=16, seed=0)
    x = torch.randn(6, 8, generator=gen(1))
    t0, t1 = torch.full((6,), 0.1), torch.full((6,), 0.9)
    out = net(x, t0)
    assert out.shape == (6, 8)
    assert (net(x, t1) - out).abs().max() > 1e-3  # the time features reach the output
    assert torch.equal(out, Mo.ScoreMLP(8, hidden=32, n_layers=2, time_dim=16, seed=0)(x, t0))
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 32), (32, 32), (32, 8)]
    proj = Mo.ScoreMLP(8, hidden=32, n_layers=2, time_dim=16, seed=0, project=lambda s: remove_com(s, 4, 2))
    p = proj(x, t0)
    torch.testing.assert_close(p.view(6, 4, 2).sum(1), torch.zeros(6, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(p, remove_com(out, 4, 2))  # projection of the same network output
    # float64 after .double(), float32 times accepted with float64 x
    out64 = net.double()(x.double(), t0)
    torch.testing.assert_close(out64, out.double(), atol=1e-5, rtol=1e-5)


def _egnn_inputs(n: int, d: int, batch: int = 5, seed: int = 0):
    x = torch.randn(batch, n * d, generator=gen(seed), dtype=torch.float64) * 1.5
    t = torch.rand(batch, generator=gen(seed + 1), dtype=torch.float64)
    return x, t


@pytest.mark.parametrize("n, d, seed", [(4, 2, 0), (5, 3, 1), (4, 2, 2)])
def test_egnn_is_e_n_and_permutation_equivariant_and_com_free(n, d, seed):
    net = Mo.EGNN(n, d, hidden=16, n_layers=3, time_dim=8, seed=seed).double()
    x, t = _egnn_inputs(n, d, seed=seed)
    out = net(x, t).view(-1, n, d)
    assert out.abs().max() > 1e-4  # not trivially zero, so the identities below test something
    torch.testing.assert_close(out.sum(1), torch.zeros(x.shape[0], d, dtype=torch.float64), atol=1e-12, rtol=0)
    b = torch.randn(d, generator=gen(seed + 2), dtype=torch.float64) * 3
    for reflect in (False, True):
        rot = _random_orthogonal(d, seed + 3, reflect)
        x_moved = (x.view(-1, n, d) @ rot.T + b).reshape(x.shape)
        torch.testing.assert_close(net(x_moved, t).view(-1, n, d), out @ rot.T, atol=1e-10, rtol=1e-9)
    perm = torch.randperm(n, generator=gen(seed + 4))
    x_perm = x.view(-1, n, d)[:, perm].reshape(x.shape)
    torch.testing.assert_close(net(x_perm, t).view(-1, n, d), out[:, perm], atol=1e-10, rtol=1e-9)
    # rows are independent: the batch does not mix
    torch.testing.assert_close(net(x[:2], t[:2]), out[:2].reshape(2, -1), atol=1e-12, rtol=0)


def test_egnn_is_not_trivially_invariant():
    # a sanity check on the test above: a generic (non-orthogonal) map breaks equivariance
    n, d = 4, 2
    net = Mo.EGNN(n, d, hidden=16, n_layers=3, time_dim=8, seed=0).double()
    x, t = _egnn_inputs(n, d)
    a = torch.tensor([[1.5, 0.3], [0.0, 0.7]], dtype=torch.float64)
    out = net(x, t).view(-1, n, d)
    moved = net((x.view(-1, n, d) @ a.T).reshape(x.shape), t).view(-1, n, d)
    assert (moved - out @ a.T).abs().max() > 1e-4
    assert (net(x, t.flip(0)) - out.reshape(x.shape)).abs().max() > 1e-6  # time matters


def test_egnn_layer_alone_is_equivariant():
    n, d, hidden = 5, 3, 12
    layer = Mo.EGNNLayer(hidden).double()
    h = torch.randn(4, n, hidden, generator=gen(0), dtype=torch.float64)
    x = torch.randn(4, n, d, generator=gen(1), dtype=torch.float64)
    h1, x1 = layer(h, x)
    assert h1.shape == h.shape and x1.shape == x.shape
    rot, b = _random_orthogonal(d, 2, reflect=True), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    h2, x2 = layer(h, x @ rot.T + b)
    torch.testing.assert_close(h2, h1, atol=1e-10, rtol=1e-9)  # features are invariant
    torch.testing.assert_close(x2, x1 @ rot.T + b, atol=1e-10, rtol=1e-9)
    perm = torch.randperm(n, generator=gen(3))
    h3, x3 = layer(h[:, perm], x[:, perm])
    torch.testing.assert_close(h3, h1[:, perm], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x3, x1[:, perm], atol=1e-10, rtol=1e-9)
    # the split first edge layer equals phi_e applied to the explicit concatenation [h_i, h_j, d^2]
    diff = x[:, :, None] - x[:, None]
    d2 = diff.pow(2).sum(-1, keepdim=True)
    cat = torch.cat([h[:, :, None].expand(-1, n, n, -1), h[:, None].expand(-1, n, n, -1), d2], -1)
    m = layer.edge_out(layer.edge_in(cat)) * (1 - torch.eye(n, dtype=torch.float64))[None, :, :, None]
    coef = layer.coord_mlp(m) / (d2 + 1).sqrt()
    coef = coef * (1 - torch.eye(n, dtype=torch.float64))[None, :, :, None]
    torch.testing.assert_close(x1, x + (diff * coef).sum(2) / (n - 1))
    torch.testing.assert_close(h1, h + layer.node_mlp(torch.cat([h, m.sum(2) / (n - 1)], -1)))


@pytest.mark.parametrize("update_features", [True, False])
def test_egnn_layer_with_shared_features_computes_each_pair_once_to_the_same_result(update_features):
    # the EGNN's first layer sees one feature vector for all particles: m_ij = m_ji, so it
    # evaluates the n (n - 1) / 2 unordered pairs only; values and gradients must not change
    n, d, hidden = 6, 3, 12
    layer = Mo.EGNNLayer(hidden, update_features=update_features).double()
    h = torch.randn(4, 1, hidden, generator=gen(0), dtype=torch.float64).expand(4, n, hidden)
    x = torch.randn(4, n, d, generator=gen(1), dtype=torch.float64, requires_grad=True)
    h_all, x_all = layer(h, x)
    h_pairs, x_pairs = layer(h, x, features_shared=True)
    torch.testing.assert_close(h_pairs, h_all, atol=1e-13, rtol=0)
    torch.testing.assert_close(x_pairs, x_all, atol=1e-13, rtol=0)
    g_all = torch.autograd.grad((x_all.sin().sum() + h_all.cos().sum()), [x, *layer.parameters()])
    g_pairs = torch.autograd.grad((x_pairs.sin().sum() + h_pairs.cos().sum()), [x, *layer.parameters()])
    for a, b in zip(g_all, g_pairs):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    from boltzlab.models.egnn import pair_incidence
    first, second, signed, unsigned = pair_incidence(n, torch.device("cpu"), torch.float64)
    assert first.numel() == n * (n - 1) // 2 and bool((first < second).all())
    torch.testing.assert_close(unsigned.sum(1), torch.full((n,), n - 1.0, dtype=torch.float64))
    with pytest.raises(Mo.ModelInputError, match="same features"):
        layer(torch.randn(4, n, hidden, generator=gen(2), dtype=torch.float64), x, features_shared=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_egnn_gradients_reach_every_parameter(dtype):
    net = Mo.EGNN(4, 2, hidden=8, n_layers=3, time_dim=8, seed=0).to(dtype)
    x, t = _egnn_inputs(4, 2)
    out = net(x.to(dtype), t)
    assert out.dtype == dtype
    (out.pow(2).sum()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # coincident particles (d = 0) give finite gradients too
    x0 = torch.zeros(2, 8, dtype=dtype, requires_grad=True)
    net(x0, torch.rand(2, dtype=dtype)).sum().backward()
    assert torch.isfinite(x0.grad).all()


def test_energy_score_is_minus_the_energy_gradient_over_kT():
    energy = Mo.EnergyMLP(3, hidden=16, n_layers=2, time_dim=8, seed=0).double()
    score = Mo.EnergyScore(energy, kT=0.5)
    x = torch.randn(4, 3, generator=gen(1), dtype=torch.float64)
    t = torch.rand(4, generator=gen(2), dtype=torch.float64)
    assert energy(x, t).shape == (4,) and torch.equal(score.energy(x, t), energy(x, t))
    s = score(x, t)
    jac = torch.autograd.functional.jacobian(lambda v: energy(v, t).sum(), x)
    torch.testing.assert_close(s, -jac / 0.5)
    # central finite differences, O(h^2) accurate
    h, fd = 1e-5, torch.zeros_like(x)
    for k in range(3):
        e_k = torch.zeros(3, dtype=torch.float64)
        e_k[k] = h
        with torch.no_grad():
            fd[:, k] = (energy(x + e_k, t) - energy(x - e_k, t)) / (2 * h)
    torch.testing.assert_close(s.detach(), -fd / 0.5, atol=1e-7, rtol=1e-6)


def test_energy_score_trains_through_the_gradient_and_detaches_under_no_grad():
    energy = Mo.EnergyMLP(2, hidden=8, n_layers=2, time_dim=4, seed=0).double()
    score = Mo.EnergyScore(energy)
    x, t = torch.randn(5, 2, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    loss = (score(x, t) - 1.0).pow(2).sum()  # a regression on the score (as NEM does)
    loss.backward()
    *weights, out_bias = energy.parameters()  # a constant offset of E does not change the score
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)
    assert out_bias.grad is None or not out_bias.grad.any()
    # the parameter gradient of that loss equals a finite difference in one weight
    w = energy.net.net[0].weight
    g = float(w.grad[0, 0])
    with torch.no_grad():
        w[0, 0] += 1e-6
    up = float((score(x, t) - 1.0).pow(2).sum().detach())
    with torch.no_grad():
        w[0, 0] -= 2e-6
    down = float((score(x, t) - 1.0).pow(2).sum().detach())
    assert g == pytest.approx((up - down) / 2e-6, rel=1e-5, abs=1e-8)
    with torch.no_grad():
        s = score(x, t)
    assert not s.requires_grad and s.shape == (5, 2)


def test_score_networks_reject_bad_input_naming_the_problem():
    net, egnn = Mo.ScoreMLP(4, hidden=8, n_layers=1, time_dim=4), Mo.EGNN(2, 2, hidden=8, n_layers=1, time_dim=4)
    x, t = torch.randn(3, 4), torch.rand(3)
    with pytest.raises(Mo.ModelInputError, match=r"x: expected shape \(batch, 4\), got \(3, 5\)"):
        net(torch.randn(3, 5), t)
    with pytest.raises(Mo.ModelInputError, match=r"t: expected shape \(3,\).*got \(3, 1\)"):
        net(x, t[:, None])
    with pytest.raises(Mo.ModelInputError, match=r"t: expected shape \(3,\).*got \(2,\)"):
        egnn(x, t[:2])
    with pytest.raises(Mo.ModelInputError, match="t: expected a floating tensor"):
        net(x, torch.ones(3, dtype=torch.long))
    with pytest.raises(Mo.ModelInputError, match="t: expected a torch.Tensor"):
        net(x, 0.5)
    with pytest.raises(Mo.ModelInputError, match="dtype torch.float64 but the network's parameters are torch.float32"):
        egnn(x.double(), t)
    with pytest.raises(Mo.ModelInputError, match=r"must return shape \(3,\), got \(3, 4\)"):
        Mo.EnergyScore(net)(x, t)
    with pytest.raises(Mo.ModelInputError, match=r"h: expected shape \(B, n, 8\)"):
        Mo.EGNNLayer(8)(torch.randn(2, 3, 7), torch.randn(2, 3, 2))


@pytest.mark.parametrize("build, match", [
    (lambda: Mo.ScoreMLP(0), "dim must be a positive integer"),
    (lambda: Mo.ScoreMLP(2, n_layers=0), "n_layers must be a positive integer"),
    (lambda: Mo.ScoreMLP(2, time_dim=5), "dim must be even"),
    (lambda: Mo.ScoreMLP(2, project=3), "project must be callable"),
    (lambda: Mo.EnergyMLP(2, hidden=-1), "hidden must be a positive integer"),
    (lambda: Mo.EGNN(1, 3), "n_particles must be at least 2"),
    (lambda: Mo.EGNN(4, 0), "spatial_dim must be a positive integer"),
    (lambda: Mo.EGNN(4, 2, n_layers=2.0), "n_layers must be a positive integer"),
    (lambda: Mo.EnergyScore(Mo.EnergyMLP(2), kT=0.0), "kT must be a positive finite number"),
    (lambda: Mo.EnergyScore(lambda x, t: x), "net must be an nn.Module"),
    (lambda: Mo.SinusoidalTimeEmbedding(4, max_period=float("nan")), "max_period must be a positive finite"),
])
def test_score_network_constructors_validate(build, match):
    with pytest.raises(Mo.ModelInputError, match=match):
        build()
