"""Tests of boltzlab.flows against brute-force Jacobians, exact densities and quadrature."""

from __future__ import annotations

import math

import pytest
import torch

from boltzlab import flows as F
from boltzlab.energies import DoubleWell2D, GaussianMixture
from boltzlab.training import double_well_exact_samples





def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise(module: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Give every parameter random values, so no layer is close to the identity."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def brute_force_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det J| of fn at each row of x (float64), from autograd's full Jacobian."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None])[0][0], row)
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def layers_under_test(dim: int) -> dict[str, F.Bijection]:
    mask = F.alternating_masks(dim, 1)[0]
    return {
        "affine": randomise(F.AffineCoupling(mask, hidden=16), 1).double(),
        "spline": randomise(F.SplineCoupling(mask, n_bins=6, bound=2.0, hidden=16), 2).double(),
        "spline_flipped_mask": randomise(F.SplineCoupling(1 - mask, n_bins=5, bound=2.5, hidden=16), 3).double(),
        "elementwise": F.ElementwiseAffine(torch.arange(dim) * 0.5, torch.linspace(0.3, 3.0, dim)).double(),
    }


def points(n: int, dim: int, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    # spread 2 puts a good share of the points in the spline's linear tails (|x| > B)
    return spread * torch.randn(n, dim, generator=gen(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("name", ["affine", "spline", "spline_flipped_mask", "elementwise"])
def test_layer_logdet_matches_autograd_jacobian(name, dim):
    layer = layers_under_test(dim)[name]
    x = points(12, dim, seed=dim)
    _, ld_fwd = layer(x)
    _, ld_inv = layer.inverse(x)
    torch.testing.assert_close(ld_fwd, brute_force_logdet(layer.forward, x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(ld_inv, brute_force_logdet(layer.inverse, x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["affine", "spline", "spline_flipped_mask", "elementwise"])
def test_layer_is_invertible(name):
    layer = layers_under_test(3)[name]
    x = points(500, 3, seed=4)
    z, ld_inv = layer.inverse(x)
    x_back, ld_fwd = layer(z)
    assert (x_back - x).abs().max() < 1e-5
    torch.testing.assert_close(ld_inv, -ld_fwd, atol=1e-9, rtol=0)


def test_coupling_layers_leave_the_masked_dimensions_alone():
    mask = torch.tensor([1, 0, 1])
    for layer in (randomise(F.AffineCoupling(mask), 5), randomise(F.SplineCoupling(mask, bound=3.0), 6)):
        x = torch.randn(50, 3, generator=gen(7))
        y, _ = layer(x)
        assert torch.equal(y[:, [0, 2]], x[:, [0, 2]])
        assert (y[:, 1] - x[:, 1]).abs().max() > 1e-3  # and do change the others


def test_zero_initialised_couplings_are_the_identity():
    x = points(100, 2)
    for layer in (F.AffineCoupling([1, 0]).double(), F.SplineCoupling([0, 1], n_bins=7, bound=3.0).double()):
        y, ld = layer(x)
        torch.testing.assert_close(y, x, atol=1e-12, rtol=0)
        torch.testing.assert_close(ld, torch.zeros(100, dtype=torch.float64), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- spline


def spline_params(k: int, bound: float, seed: int, batch: int = 1):
    g = gen(seed)
    widths = torch.softmax(torch.randn(batch, k, generator=g, dtype=torch.float64), -1) * 2 * bound
    heights = torch.softmax(torch.randn(batch, k, generator=g, dtype=torch.float64), -1) * 2 * bound
    inner = torch.exp(torch.randn(batch, k - 1, generator=g, dtype=torch.float64))
    ones = torch.ones(batch, 1, dtype=torch.float64)
    return widths, heights, torch.cat([ones, inner, ones], -1)


def test_spline_passes_through_its_knots_with_the_given_slopes():
    bound, k = 3.0, 7
    w, h, d = spline_params(k, bound, seed=8)
    x_knots = torch.cat([torch.zeros(1, 1, dtype=torch.float64), w.cumsum(-1)], -1)[0] - bound
    y_knots = torch.cat([torch.zeros(1, 1, dtype=torch.float64), h.cumsum(-1)], -1)[0] - bound
    x = x_knots.clone().requires_grad_(True)
    expand = lambda t: t.expand(k + 1, t.shape[-1])  # noqa: E731
    y, log_slope = F.rational_quadratic_spline(x, expand(w), expand(h), expand(d), bound)
    torch.testing.assert_close(y, y_knots, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_slope.exp(), d[0], atol=1e-10, rtol=1e-10)
    # the analytic slope agrees with autograd at the knots too
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, d[0], atol=1e-10, rtol=1e-10)


def test_spline_is_monotone_continuous_and_the_identity_in_the_tails():
    bound, k = 2.0, 9
    w, h, d = spline_params(k, bound, seed=9)
    x = torch.linspace(-4.0, 4.0, 40_001, dtype=torch.float64)
    y, log_slope = F.rational_quadratic_spline(x, w.expand(x.numel(), k), h.expand(x.numel(), k),
                                               d.expand(x.numel(), k + 1), bound)
    assert bool((torch.diff(y) > 0).all())
    assert torch.diff(y).max() < 2e-4 * math.exp(float(log_slope.max())) + 1e-9  # no jumps
    tails = x.abs() > bound
    torch.testing.assert_close(y[tails], x[tails], atol=0, rtol=0)
    assert bool((log_slope[tails] == 0).all())
    # the slope is continuous at ±B, where it equals the tails' slope 1
    eps = 1e-8
    edges = torch.tensor([-bound - eps, -bound + eps, bound - eps, bound + eps], dtype=torch.float64)
    _, log_slope_edges = F.rational_quadratic_spline(edges, w.expand(4, k), h.expand(4, k), d.expand(4, k + 1), bound)
    assert log_slope_edges.abs().max() < 1e-5


def test_spline_inverse_undoes_the_spline():
    bound, k = 2.5, 6
    w, h, d = spline_params(k, bound, seed=10, batch=2000)
    x = 3.0 * torch.randn(2000, generator=gen(11), dtype=torch.float64)
    y, ld = F.rational_quadratic_spline(x, w, h, d, bound)
    x_back, ld_inv = F.rational_quadratic_spline(y, w, h, d, bound, inverse=True)
    assert (x_back - x).abs().max() < 1e-9
    torch.testing.assert_close(ld_inv, -ld, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- flows


def random_flows() -> dict[str, F.Flow]:
    return {
        "realnvp": randomise(F.realnvp(2, n_layers=4, hidden=16, scale=1.5), 12, std=0.3).double(),
        "spline": randomise(F.spline_flow(2, n_layers=3, n_bins=6, bound=3.0, hidden=16), 13, std=0.3).double(),
    }


@pytest.mark.parametrize("name", ["realnvp", "spline"])
def test_flow_logdet_and_log_prob_match_autograd(name):
    flow = random_flows()[name]
    x = points(10, 2, seed=14)
    z, ld = flow.inverse(x)
    torch.testing.assert_close(ld, brute_force_logdet(flow.inverse, x), atol=1e-8, rtol=1e-8)
    # log q(x) = log N(z) + log|det ∂z/∂x|, with N written out independently
    expected = -0.5 * (z**2).sum(-1) - math.log(2 * math.pi) + brute_force_logdet(flow.inverse, x)
    torch.testing.assert_close(flow.log_prob(x), expected, atol=1e-8, rtol=1e-8)
    _, ld_fwd = flow(z)
    torch.testing.assert_close(ld_fwd, brute_force_logdet(flow.forward, z), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", ["realnvp", "spline"])
def test_flow_round_trip(name):
    flow = random_flows()[name]
    x = points(1000, 2, seed=15, spread=3.0)
    z, _ = flow.inverse(x)
    assert (flow(z)[0] - x).abs().max() < 1e-5
    z2 = torch.randn(1000, 2, generator=gen(16), dtype=torch.float64)
    assert (flow.inverse(flow(z2)[0])[0] - z2).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["realnvp", "spline"])
def test_samples_carry_their_log_density(name):
    flow = random_flows()[name]
    x, log_q = flow.sample(300, generator=gen(17))
    assert x.shape == (300, 2) and log_q.shape == (300,)
    torch.testing.assert_close(log_q, flow.log_prob(x), atol=1e-9, rtol=1e-9)
    x_again, _ = flow.sample(300, generator=gen(17))
    assert torch.equal(x, x_again)


@pytest.mark.parametrize("name", ["realnvp", "spline"])
def test_random_flow_density_integrates_to_one(name):
    flow = random_flows()[name]
    xs, ys, log_q = F.log_prob_on_grid(flow, (-14, 14), (-14, 14), grid=500)
    mass = float(log_q.exp().sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))
    assert mass == pytest.approx(1.0, abs=1e-3)
    # every intermediate density (after the first k coupling layers) is normalised as well
    stages = F.coupling_stages(flow)
    assert len(stages) == flow.n_layers  # 0 .. L couplings; the final scale layer is in every stage
    for stage in stages:
        xs, ys, log_q = F.log_prob_on_grid(stage, (-14, 14), (-14, 14), grid=600)
        assert float(log_q.exp().sum() * (xs[1] - xs[0]) * (ys[1] - ys[0])) == pytest.approx(1.0, abs=1e-3)
    x = points(50, 2, seed=27)
    torch.testing.assert_close(stages[-1].log_prob(x), flow.log_prob(x), atol=0, rtol=0)


def test_untrained_flow_is_the_gaussian_it_claims():
    loc, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    flow = F.spline_flow(2, loc=loc, scale=scale).double()
    x = points(200, 2, seed=18)
    exact = torch.distributions.Normal(loc.double(), scale.double()).log_prob(x).sum(-1)
    # log(scale) was stored in float32 before .double(): agreement to float32 rounding
    torch.testing.assert_close(flow.log_prob(x), exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(F.Flow([], 2).log_prob(x), F.standard_normal_log_prob(x), atol=0, rtol=0)
    torch.testing.assert_close(F.coupling_stages(flow)[0].log_prob(x), exact, atol=1e-6, rtol=0)


def test_flow_construction_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = F.realnvp(2, zero_init=False, seed=5)
    after = torch.rand(1)
    b = F.realnvp(2, zero_init=False, seed=5)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_input_is_named():
    flow = F.realnvp(2)
    with pytest.raises(F.FlowInputError, match=r"expected shape \(\.\.\., 2\), got \(5, 3\)"):
        flow.log_prob(torch.zeros(5, 3))
    with pytest.raises(F.FlowInputError, match="1 entries are NaN or infinite"):
        flow.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(F.FlowInputError, match="floating"):
        flow.log_prob(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="0s and 1s"):
        F.AffineCoupling([0, 2])
    with pytest.raises(ValueError, match="keep some dimensions"):
        F.SplineCoupling([1, 1])
    with pytest.raises(ValueError, match="dim >= 2"):
        F.alternating_masks(1, 2)


# ----------------------------------------------------------------------------- training


def test_maximum_likelihood_learns_a_gaussian_and_is_reproducible():
    # data N(mu, diag(sd^2)) rotated by 30 degrees: the exact NLL is its entropy
    mu, sd = torch.tensor([2.0, -1.0]), torch.tensor([2.0, 0.5])
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    rot = torch.tensor([[c, -s], [s, c]])
    data = mu + (torch.randn(4000, 2, generator=gen(19)) * sd) @ rot.T
    test = mu + (torch.randn(4000, 2, generator=gen(20)) * sd) @ rot.T
    entropy = float(torch.log(sd).sum() + math.log(2 * math.pi * math.e))
    runs = []
    for _ in range(2):
        flow = F.realnvp(2, n_layers=4, hidden=32)
        history = F.train(flow, 400, batch_size=256, lr=5e-3, data=data, seed=3, progress=False)
        runs.append(history["loss"])
    assert runs[0] == runs[1]
    with torch.no_grad():
        held_out_nll = -float(flow.log_prob(test).mean())
    # NLL = entropy + KL(p || q) >= entropy (up to the finite test set's noise, SE ~ 0.01)
    assert entropy - 0.05 < held_out_nll < entropy + 0.08


@pytest.mark.slow
def test_trained_flow_density_integrates_to_one_and_holds_the_deep_well_mass():
    dw = DoubleWell2D()
    data = double_well_exact_samples(6000, dw, generator=gen(21))
    flow = F.spline_flow(2, n_layers=4, n_bins=8, bound=4.0, hidden=32, scale=[1.8, 1.0])
    F.train(flow, 600, batch_size=256, lr=3e-3, data=data, progress=False)
    xs, ys, log_q = F.log_prob_on_grid(flow.double(), (-6, 6), (-8, 8), grid=500)
    cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    q = log_q.exp()
    assert float(q.sum() * cell) == pytest.approx(1.0, abs=1e-3)
    assert float(q[:, xs < 0].sum() * cell) == pytest.approx(dw.well_probabilities()[0], abs=0.01)


def test_reverse_kl_loss_is_minus_log_z_plus_the_kl_on_a_grid():
    """E_q[E/kT + log q] = -log Z + KL(q||p) for any q: Monte Carlo against quadrature."""
    dw = DoubleWell2D()
    flow = randomise(F.realnvp(2, n_layers=2, hidden=8, scale=[1.5, 1.0]), 22, std=0.2).double()
    with torch.no_grad():
        x, log_q = flow.sample(200_000, generator=gen(23))
        terms = dw.energy(x) / dw.kT + log_q
    loss, se = float(terms.mean()), float(terms.std() / math.sqrt(terms.numel()))
    kl, mass = F.kl_on_grid(flow, dw, dw.log_z(), (-8, 8), (-10, 10), grid=600)
    assert mass == pytest.approx(1.0, abs=1e-4)
    assert kl > 0.1  # a random flow is far from p, so the check is not trivial
    assert loss + dw.log_z() == pytest.approx(kl, abs=4 * se + 1e-3)


def test_kl_on_grid_matches_the_closed_form_between_gaussians():
    # q = N(loc, diag(scale^2)) (an untrained flow), p = N(mu, s^2 I) (a one-mode mixture)
    loc, scale, mu, s = torch.tensor([0.5, -0.5]), torch.tensor([1.5, 0.7]), torch.tensor([[0.0, 0.3]]), 1.1
    flow = F.realnvp(2, loc=loc, scale=scale)
    target = GaussianMixture(means=mu, std=s)
    exact = float((torch.log(s / scale) + (scale**2 + (loc - mu[0]) ** 2) / (2 * s**2) - 0.5).sum())
    kl, mass = F.kl_on_grid(flow, target, 0.0, (-9, 9), (-9, 9), grid=600)
    assert mass == pytest.approx(1.0, abs=1e-6)
    assert kl == pytest.approx(exact, rel=1e-4)


def test_reverse_kl_training_finds_a_gaussian_from_its_energy():
    target = GaussianMixture(means=torch.tensor([[3.0, -1.0]]), std=0.7)  # log Z = 0
    flow = F.realnvp(2, n_layers=4, hidden=32)
    history = F.train(flow, 500, batch_size=256, lr=5e-3, energy=target, progress=False)
    with torch.no_grad():
        x, log_q = flow.sample(20_000, generator=gen(24))
        loss = float((target.energy(x) + log_q).mean())
    assert 0.0 - 0.01 < loss < 0.03  # the bound -log Z = 0 is reached from above
    assert history["kT"] == [1.0] * 500 and "nll" not in history.values
    torch.testing.assert_close(x.mean(0), torch.tensor([3.0, -1.0]), atol=0.03, rtol=0)


def test_mixed_and_annealed_training_record_what_they_used():
    target = GaussianMixture(means=torch.tensor([[0.0, 0.0]]), std=1.0)
    data = target.sample(500, generator=gen(25))
    schedule = F.annealing_schedule(4.0, 1.0, 20, anneal_fraction=0.5)
    history = F.train(F.realnvp(2, n_layers=2, hidden=8), 20, batch_size=32, data=data, energy=target,
                      ml_weight=0.3, kT=schedule, progress=False)
    assert history["kT"] == schedule.tolist()
    for loss, kl, nll in zip(history["loss"], history["reverse_kl"], history["nll"]):
        assert loss == pytest.approx(0.7 * kl + 0.3 * nll, rel=1e-5)


def test_annealing_schedule_is_geometric_then_constant():
    kT = F.annealing_schedule(16.0, 1.0, 10, anneal_fraction=0.5)
    torch.testing.assert_close(kT, torch.tensor([16.0, 8.0, 4.0, 2.0, 1.0, 1, 1, 1, 1, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        F.annealing_schedule(0.0, 1.0, 10)


def test_train_rejects_inconsistent_requests():
    flow = F.realnvp(2, n_layers=2)
    target, data = GaussianMixture(), torch.zeros(10, 2)
    with pytest.raises(ValueError, match="needs data .* an energy"):
        F.train(flow, 1)
    with pytest.raises(ValueError, match="give ml_weight"):
        F.train(flow, 1, data=data, energy=target)
    with pytest.raises(ValueError, match="needs data for the maximum-likelihood term"):
        F.train(flow, 1, energy=target, ml_weight=0.5)
    with pytest.raises(ValueError, match=r"schedule of shape \(3,\)"):
        F.train(flow, 3, energy=target, kT=torch.ones(4))
    with pytest.raises(F.FlowInputError, match=r"data: expected shape \(\.\.\., 2\)"):
        F.train(flow, 1, data=torch.zeros(10, 3))


def test_annealing_curriculum_keeps_both_modes():
    """Two well-separated modes: the annealing curriculum (reverse KL hot, then reweighted maximum
    likelihood down the ladder) keeps both, about 50/50, for every seed tried (0.51-0.54 over four).
    Plain reverse KL at kT = 1 is not compared here: whether 400 steps of it collapse onto one mode
    depends on the seed and on the machine's floating-point path (measured: right-mode shares from
    0.03 to 0.997 over nine seeds), so chapter 03 measures and reports it instead of assuming it."""
    target = GaussianMixture(means=torch.tensor([[-5.0, 0.0], [5.0, 0.0]]), std=0.6)
    for flow_seed, train_seed in ((1, 0), (3, 2)):
        annealed = F.spline_flow(2, n_layers=2, n_bins=8, bound=4.0, hidden=16, scale=3.0, seed=flow_seed)
        stages = F.train_annealed(annealed, target, [16.0, 6.0, 2.5, 1.0], first_steps=200, steps_per_stage=100,
                                  pool_size=2000, batch_size=128, lr=5e-3, n_record=500, progress=False,
                                  seed=train_seed)
        assert [s.kT for s in stages] == [16.0, 6.0, 2.5, 1.0] and math.isnan(stages[0].ess_fraction)
        assert all(0.05 < s.ess_fraction <= 1.0 for s in stages[1:])
        assert stages[-1].samples.shape == (500, 2)
        rows = F.ladder_table(stages).cells
        assert [r[1] for r in rows] == ["16.00", "6.00", "2.50", "1.00"]
        assert rows[0][2] == "" and rows[1][2] == f"{stages[1].ess_fraction:.3f}"
        with torch.no_grad():
            right = float((annealed.sample(4000, generator=gen(28))[0][:, 0] > 0).float().mean())
        assert right == pytest.approx(0.5, abs=0.1)


def test_train_annealed_and_weighted_data_reject_bad_requests():
    flow, target = F.realnvp(2, n_layers=2), GaussianMixture()
    with pytest.raises(ValueError, match="must decrease"):
        F.train_annealed(flow, target, [1.0, 2.0], 1, 1)
    with pytest.raises(ValueError, match="at least two positive temperatures"):
        F.train_annealed(flow, target, [3.0], 1, 1)
    with pytest.raises(ValueError, match=r"data_log_weights must have shape \(10,\)"):
        F.train(flow, 1, data=torch.zeros(10, 2), data_log_weights=torch.zeros(9))
    with pytest.raises(ValueError, match="NaN"):
        F.train(flow, 1, data=torch.zeros(2, 2), data_log_weights=torch.tensor([0.0, float("nan")]))
