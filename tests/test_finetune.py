"""Reward-guided fine-tuning (boltzlab.finetune) against closed forms: tilted Gaussians,
order statistics of uniforms, Boltzmann densities at two temperatures, Monte Carlo best-of-N."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from boltzlab.diffusion import DiffusionInputError, GeometricNoiseSchedule
from boltzlab.energies import DoubleWell2D
from boltzlab.finetune import (
    BoltzmannReward,
    DistillationConfig,
    FinetuneInputError,
    PreconditionedScore,
    best_of_n,
    best_of_n_grid_probs,
    best_of_n_kl,
    composed_alpha,
    fit_score_model,
    grid_kl,
    iterative_distillation,
    reward_weights,
    rollin,
    rollout,
    soft_optimal_weights,
    tempering_alphas,
    tilted_score_target,
)
from boltzlab.models import ScoreMLP

F64 = torch.float64
SCHEDULE = GeometricNoiseSchedule(0.01, 20.0)


class GaussianScore(nn.Module):
    """The exact noised score of N(mu, v I) for learnable mu (dim,) and log v: a model family
    that contains every Gaussian, so a fine-tuned model can be compared with the exact tilt."""

    def __init__(self, mu: list[float], var: float, schedule: GeometricNoiseSchedule = SCHEDULE) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=F64))
        self.log_var = nn.Parameter(torch.tensor(math.log(var), dtype=F64))
        self.schedule = schedule

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(x - self.mu) / (self.log_var.exp() + self.schedule.variance(t))[:, None]


# ----------------------------------------------------------------------------------------
# soft-optimal weights and value: tilted Gaussians
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_soft_weights_and_value_linear_reward(alpha):
    # x ~ N(m, s^2), r = a x: e^{r/alpha} tilts to N(m + a s^2/alpha, s^2) and
    # V = alpha log E[e^{a x/alpha}] = a m + a^2 s^2 / (2 alpha)
    m, s, a, n = 0.3, 0.8, 1.5, 400_000
    x = m + s * torch.randn(1, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    w, v = soft_optimal_weights(a * x, alpha)
    assert w.shape == (1, n) and v.shape == (1,)
    assert torch.allclose(w.sum(1), torch.ones(1, dtype=F64))
    ess = 1 / float(w.pow(2).sum())
    tilted_mean = float((w * x).sum())
    assert abs(tilted_mean - (m + a * s**2 / alpha)) < 5 * s / math.sqrt(ess)
    assert abs(float(v) - (a * m + a**2 * s**2 / (2 * alpha))) < 0.02 * (1 + a**2 * s**2 / alpha)


def test_soft_weights_quadratic_reward_and_limits():
    # x ~ N(0, s^2), r = -c x^2/2: tilted variance s^2 / (1 + c s^2/alpha),
    # V = -(alpha/2) log(1 + c s^2/alpha)
    s, c, alpha, n = 1.3, 2.0, 1.5, 400_000
    x = s * torch.randn(1, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    w, v = soft_optimal_weights(-c * x**2 / 2, alpha)
    var = float((w * x**2).sum())
    assert abs(var / (s**2 / (1 + c * s**2 / alpha)) - 1) < 0.02
    assert abs(float(v) + alpha / 2 * math.log(1 + c * s**2 / alpha)) < 0.01
    r = torch.tensor([[1.0, 2.0, 5.0, -3.0]], dtype=F64)
    assert abs(float(soft_optimal_weights(r, 1e4)[1]) - float(r.mean())) < 1e-2  # alpha -> inf: mean reward
    assert abs(float(soft_optimal_weights(r, 1e-3)[1]) - (5.0 - 1e-3 * math.log(4))) < 1e-6  # alpha -> 0: max
    w_big, v_big = soft_optimal_weights(r * 1e4, 1.0)  # no overflow
    assert torch.isfinite(w_big).all() and torch.isfinite(v_big).all() and float(w_big[0, 2]) == 1.0


# ----------------------------------------------------------------------------------------
# the Boltzmann reward and the tilt schedule
# ----------------------------------------------------------------------------------------


def test_boltzmann_reward_tilts_hot_to_cold_exactly():
    dw = DoubleWell2D()
    reward = BoltzmannReward(dw, kT=1.0, kT0=3.0)
    x = 3 * torch.randn(100, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    # log p_kT0 + r - log p_kT is the same constant log Z_kT - log Z_kT0 at every x
    gap = -dw.energy(x) / 3.0 + reward(x) + dw.energy(x) / 1.0
    assert torch.allclose(gap, torch.zeros_like(gap), atol=1e-10)
    assert reward.tilted_kT(1.0) == pytest.approx(1.0)
    assert reward.tilted_kT(0.0) == pytest.approx(3.0)
    assert reward.tilted_kT(0.5) == pytest.approx(1 / (1 / 3 + 0.5 * (1 - 1 / 3)))


@pytest.mark.parametrize("n_rounds, alpha_total", [(1, 1.0), (4, 1.0), (3, 0.5)])
def test_composed_tilt_of_refresh_schedule_is_exp_r(n_rounds, alpha_total):
    alphas = tempering_alphas(n_rounds, alpha_total)
    assert len(alphas) == n_rounds
    r = torch.randn(50, generator=torch.Generator().manual_seed(4), dtype=F64) * 5
    composed = torch.ones_like(r)
    for a in alphas:  # each refresh multiplies the target by the round's tilt
        composed = composed * torch.exp(r / a)
    assert torch.allclose(composed, torch.exp(r / alpha_total), rtol=1e-12)
    assert composed_alpha(alphas) == pytest.approx(alpha_total)
    assert composed_alpha([1.0, 1.0]) == pytest.approx(0.5)  # alpha = 1 every round compounds to exp(2 r)


# ----------------------------------------------------------------------------------------
# roll-in, roll-out and the distillation target on Gaussians (exact posteriors)
# ----------------------------------------------------------------------------------------


def test_rollout_samples_the_exact_gaussian_posterior():
    # data N(m, v I): x_0 | x_t ~ N(m + v/(v + s2)(x_t - m), v s2/(v + s2))
    m, v = torch.tensor([1.0, -0.5], dtype=F64), 0.7
    score = GaussianScore(m.tolist(), v)
    t = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
    x_t = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-3.0, 4.0]], dtype=F64)
    with torch.no_grad():
        x0 = rollout(score, SCHEDULE, x_t, t, 400, n_rollouts=4000, generator=torch.Generator().manual_seed(5))
    assert x0.shape == (3, 4000, 2)
    s2 = SCHEDULE.variance(t)[:, None]
    post_mean = m + v / (v + s2) * (x_t - m)
    post_var = v * s2 / (v + s2)
    assert torch.allclose(x0.mean(1), post_mean, atol=5 * float(post_var.max().sqrt()) / math.sqrt(4000) + 0.02)
    assert torch.allclose(x0.var(1), post_var.expand(3, 2), rtol=0.1)


def test_rollin_states_follow_the_noised_marginal():
    m, v = torch.tensor([0.5, -1.0], dtype=F64), 1.5
    score = GaussianScore(m.tolist(), v)
    x_t, t = rollin(score, SCHEDULE, 4000, 2, 100, generator=torch.Generator().manual_seed(6))
    assert x_t.shape == (4000, 2) and t.shape == (4000,)
    assert float(t.min()) > 0 and float(t.max()) <= 1
    z = (x_t - m) / (v + SCHEDULE.variance(t))[:, None].sqrt()  # standard normal if x_t ~ p_t
    assert abs(float(z.mean())) < 0.05 and abs(float(z.var()) - 1) < 0.08


@pytest.mark.parametrize("use_teacher", [False, True])
def test_tilted_target_is_the_exact_tilted_score(use_teacher):
    # teacher N(0, v), reward r = a . x: tilted N(a v/alpha, v), noised score -(x - a v/alpha)/(v + s2)
    v, a, alpha = 0.8, torch.tensor([1.0, -2.0], dtype=F64), 2.0
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([0.4, 0.7, 0.95], dtype=F64)
    x_t = torch.tensor([[0.5, 0.5], [-1.0, 2.0], [3.0, -4.0]], dtype=F64)
    s2 = SCHEDULE.variance(t)[:, None]
    post_mean, post_std = v / (v + s2) * x_t, (v * s2 / (v + s2)).sqrt()
    x0 = post_mean[:, None] + post_std[:, None] * torch.randn(3, 20_000, 2, generator=g, dtype=F64)
    teacher = -x_t / (v + s2) if use_teacher else None
    target, value, ess = tilted_score_target(x_t, t, x0, x0 @ a, alpha, SCHEDULE, teacher)
    exact = -(x_t - a * v / alpha) / (v + s2)
    assert torch.allclose(target, exact, atol=0.05 * float(exact.abs().max()))
    exact_value = post_mean @ a + (post_std**2 * a**2).sum(-1) / (2 * alpha)  # alpha log E[e^{a.x0/alpha}]
    assert torch.allclose(value, exact_value, atol=0.05)
    assert bool(((ess > 1) & (ess <= 20_000)).all())


def test_leave_one_out_baseline_removes_first_order_bias():
    # small tilt, M = 4: the plain self-normalised shift is (M-1)/M of the true one
    v, a, alpha, m_roll, n = 1.0, 0.2, 1.0, 4, 200_000
    g = torch.Generator().manual_seed(8)
    x_t = torch.zeros(n, 1, dtype=F64)
    t = torch.full((n,), 1.0, dtype=F64)
    s2 = SCHEDULE.variance(t[:1])
    post_std = math.sqrt(v * float(s2) / (v + float(s2)))
    x0 = post_std * torch.randn(n, m_roll, 1, generator=g, dtype=F64)
    teacher = torch.zeros(n, 1, dtype=F64)
    target, _, _ = tilted_score_target(x_t, t, x0, a * x0[..., 0], alpha, SCHEDULE, teacher)
    shift = float(target.mean()) * float(s2)
    exact_shift = post_std**2 * math.expm1(0) + a * post_std**2 / alpha  # tilted posterior mean moves by a s_post^2
    w = torch.softmax(a * x0[..., 0] / alpha, 1)
    plain_shift = float(((w - 1 / m_roll) * x0[..., 0]).sum(1).mean())
    se = post_std / math.sqrt(n)
    assert abs(shift - exact_shift) < 4 * se + 0.01 * exact_shift
    assert abs(plain_shift - (m_roll - 1) / m_roll * exact_shift) < 4 * se + 0.01 * exact_shift


# ----------------------------------------------------------------------------------------
# the whole loop on a Gaussian family (exact answer after every round)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rollin_model", ["student", "pretrained", "mixture"])
def test_iterative_distillation_reaches_the_composed_tilt(rollin_model):
    # pretrained N(mu0, v); r = a . x; after round k of K the target is N(mu0 + (k/K) a v, v),
    # whichever model makes the roll-in states (off-policy roll-in)
    mu0, v, a = [0.5, -0.5], 0.6, torch.tensor([1.0, 0.5], dtype=F64)
    pretrained = GaussianScore(mu0, v)
    config = DistillationConfig(n_rounds=2, collections_per_round=1, n_states=512, n_rollouts=8,
                                steps_per_collection=150, batch_size=256, sde_steps=40, rollout_steps=20, lr=0.02,
                                rollin=rollin_model)
    result = iterative_distillation(pretrained, lambda x: x @ a, SCHEDULE, 2, config, seed=0, progress=False)
    assert result.alphas == (2.0, 2.0) and result.tilts == pytest.approx([0.5, 1.0])
    assert len(result.snapshots) == 2 and len(result.history["loss"]) == 300
    for k, snap in enumerate(result.snapshots):
        expected = torch.tensor(mu0, dtype=F64) + result.tilts[k] * a * v
        assert torch.allclose(snap["mu"], expected, atol=0.06), (k, snap["mu"], expected)
        assert abs(float(snap["log_var"].exp()) - v) < 0.1
    assert torch.equal(pretrained.mu.detach(), torch.tensor(mu0, dtype=F64))  # the pretrained model is untouched
    assert config.score_evaluations(2) == 2 * 512 * (40 + 8 * 20 * 3 + 1)


# ----------------------------------------------------------------------------------------
# reward-weighted regression
# ----------------------------------------------------------------------------------------


def test_reward_weights_reweight_to_the_tilted_gaussian():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(9), dtype=F64)
    w = reward_weights(1.2 * x, alpha=2.0)
    assert w.shape == x.shape and float(w.sum()) == pytest.approx(1.0)
    assert torch.allclose(w, torch.softmax(0.6 * x, 0))
    assert float((w * x).sum()) == pytest.approx(0.6, abs=0.02)  # N(0,1) tilted by e^{0.6 x}: mean 0.6


def test_reward_weighted_regression_learns_the_tilted_score():
    # pool from N(0, I), weights e^{a.x}: the fitted model should be N(a, I)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(20_000, 2, generator=g, dtype=F64)
    a = torch.tensor([0.8, -0.4], dtype=F64)
    model = GaussianScore([0.0, 0.0], 1.0)
    fit_score_model(model, x, SCHEDULE, 400, weights=reward_weights(x @ a), batch_size=512, lr=0.02, progress=False)
    assert torch.allclose(model.mu.detach(), a, atol=0.06)
    assert abs(float(model.log_var.detach().exp()) - 1.0) < 0.1


def test_preconditioned_score_shapes_and_gaussian_limit():
    net = ScoreMLP(2, hidden=16, n_layers=1, seed=0)
    nn.init.zeros_(net.net.net[-1].weight)
    nn.init.zeros_(net.net.net[-1].bias)
    model = PreconditionedScore(net, SCHEDULE, data_std=1.7)
    x, t = torch.randn(5, 2), torch.rand(5)
    # with a zero network the model is the exact noised score of N(0, 1.7^2 I)
    assert torch.allclose(model(x, t), -x / (1.7**2 + SCHEDULE.variance(t))[:, None], rtol=1e-5)


# ----------------------------------------------------------------------------------------
# best-of-N
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 10])
def test_best_of_n_of_uniforms_has_cdf_u_to_the_n(n):
    g = torch.Generator().manual_seed(11)
    b = 20_000
    cand = torch.rand(b, n, 1, generator=g, dtype=F64)
    best = best_of_n(cand, cand[..., 0])[:, 0]
    assert best.shape == (b,)
    u = torch.sort(best).values
    ks = float(((torch.arange(1, b + 1, dtype=F64) / b) - u.pow(n)).abs().max())
    assert ks < 1.63 / math.sqrt(b)  # Kolmogorov-Smirnov at the 1% level against F(u) = u^n


def test_best_of_n_grid_probs_match_monte_carlo_and_kl_formula():
    # q0 = N(0, 1) on fine cells, non-monotone reward -(x - 0.5)^2 (sorting matters)
    edges = torch.linspace(-6, 6, 1201, dtype=F64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    cdf = torch.special.ndtr(edges)
    probs = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    reward = lambda x: -(x - 0.5) ** 2
    n = 5
    bon = best_of_n_grid_probs(probs, reward(centres), n)
    assert float(bon.sum()) == pytest.approx(1.0)
    assert grid_kl(bon.log(), probs.log()) == pytest.approx(best_of_n_kl(n), abs=2e-3)
    g = torch.Generator().manual_seed(12)
    cand = torch.randn(100_000, n, 1, generator=g, dtype=F64)
    best = best_of_n(cand, reward(cand[..., 0]))[:, 0]
    coarse = torch.linspace(-3, 4, 15, dtype=F64)  # compare masses on 14 wide bins
    mc = torch.histogram(best, coarse).hist / best.numel()
    idx = torch.bucketize(centres, coarse) - 1
    exact = torch.stack([bon[idx == k].sum() for k in range(14)])
    assert torch.allclose(mc, exact, atol=4 * math.sqrt(0.25 / 100_000) + 1e-3)


def test_best_of_n_grid_probs_with_tied_rewards_matches_argmax_sampling():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=F64)
    rewards = torch.tensor([1.0, 2.0, 2.0, 0.0, 1.0])  # cells 1 and 2 tie, cells 0 and 4 tie
    bon = best_of_n_grid_probs(probs, rewards, 3)
    g = torch.Generator().manual_seed(13)
    cells = torch.multinomial(probs.expand(200_000, 5), 3, replacement=True, generator=g)  # (B, 3)
    r = rewards[cells]
    picked = cells[torch.arange(cells.shape[0]), r.argmax(1)]
    mc = torch.bincount(picked, minlength=5).to(F64) / cells.shape[0]
    assert torch.allclose(mc, bon, atol=0.005)


def test_grid_kl_against_gaussians():
    x = torch.linspace(-15, 17, 6401, dtype=F64)
    log_p = -0.5 * x**2
    log_q = -0.5 * (x - 1) ** 2 / 4
    # KL(N(0,1) || N(1, 4)) = log 2 + (1 + 1)/8 - 1/2
    assert grid_kl(log_p, log_q) == pytest.approx(math.log(2) + 2 / 8 - 0.5, abs=1e-6)
    assert grid_kl(log_p, log_p) == pytest.approx(0.0, abs=1e-12)
    assert grid_kl(torch.tensor([0.0, -math.inf]), torch.tensor([0.0, 0.0])) == pytest.approx(math.log(2))
    assert grid_kl(torch.tensor([0.0, 0.0]), torch.tensor([0.0, -math.inf])) == math.inf


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: soft_optimal_weights(torch.zeros(5), 1.0), r"shape \(B, M\)"),
    (lambda: soft_optimal_weights(torch.tensor([[0.0, float("nan")]]), 1.0), "NaN"),
    (lambda: soft_optimal_weights(torch.zeros(2, 3), 0.0), "alpha must be a positive"),
    (lambda: tempering_alphas(0), "n_rounds must be a positive int"),
    (lambda: composed_alpha([]), "alphas is empty"),
    (lambda: BoltzmannReward(DoubleWell2D(), kT=-1.0, kT0=3.0), "kT must be a positive"),
    (lambda: DistillationConfig(rollin="teacher"), "unknown roll-in model"),
    (lambda: DistillationConfig(n_rounds=3, alphas=(1.0, 1.0)), "alphas has 2 entries for 3 rounds"),
    (lambda: tilted_score_target(torch.zeros(2, 2), torch.ones(2), torch.zeros(2, 1, 2), torch.zeros(2, 1), 1.0,
                                 SCHEDULE), "M >= 2"),
    (lambda: tilted_score_target(torch.zeros(2, 2), torch.zeros(2), torch.zeros(2, 3, 2), torch.zeros(2, 3), 1.0,
                                 SCHEDULE), "t must be > 0"),
    (lambda: tilted_score_target(torch.zeros(2, 2), torch.ones(2), torch.zeros(2, 3, 2), torch.zeros(3, 3), 1.0,
                                 SCHEDULE), "inconsistent shapes"),
    (lambda: rollout(lambda x, t: x, SCHEDULE, torch.zeros(2, 2), torch.zeros(2), 5), r"\(0, 1\]"),
    (lambda: best_of_n(torch.zeros(4, 3, 2), torch.zeros(4, 2)), r"expected \(4, 3\)"),
    (lambda: best_of_n_grid_probs(torch.full((4,), 0.5), torch.zeros(4), 2), "sum to 1"),
    (lambda: grid_kl(torch.zeros(3), torch.zeros(4)), "differ in shape"),
    (lambda: reward_weights(torch.zeros(3, 1)), r"shape \(n,\)"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(FinetuneInputError, match=match):
        call()


@pytest.mark.parametrize("kwargs, match", [
    ({"weights": torch.ones(9)}, "9 entries for 10 samples"),
    ({"weights": -torch.ones(10)}, "non-negative with a positive sum"),
    ({"lr": 0.0}, "lr must be a positive finite number"),
])
def test_fit_score_model_bad_input_is_named(kwargs, match):
    # fit_score_model is diffusion training (boltzlab.diffusion, re-exported by finetune)
    assert issubclass(DiffusionInputError, ValueError)
    with pytest.raises(DiffusionInputError, match=match):
        fit_score_model(GaussianScore([0.0], 1.0), torch.zeros(10, 1), SCHEDULE, 5, **kwargs)
