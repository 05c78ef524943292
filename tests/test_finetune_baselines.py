"""The methods VIDD is compared with (boltzlab.finetune.policy, .baselines, .vidd roll-ins) against
closed forms: the exact gradient and the exact optimum of the discretised chain of a Gaussian
sampler, exact tilted optima of piecewise-constant rewards, and hand-counted pair structures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from boltzlab.diffusion import GeometricNoiseSchedule
from boltzlab.energies import Energy, dw4
from boltzlab.finetune import (
    BoltzmannReward,
    DistillationConfig,
    FinetuneInputError,
    GaussianScore,
    InnerPairReward,
    PolicyGradientConfig,
    RewardBackpropConfig,
    best_of_n,
    discrete_tilted_optimum,
    fit_score_model,
    gaussian_chain_moments,
    gaussian_chain_objective,
    gaussian_chain_optimum,
    iteration_cost,
    iterative_distillation,
    path_kl_terms,
    policy_gradient,
    policy_gradient_surrogate,
    reward_backprop,
    reward_backprop_loss,
    reward_weights,
    rollin,
    sample_trajectories,
    tilted_optimum,
)
from boltzlab.finetune.vidd import rollin_states

F64 = torch.float64
SCHEDULE = GeometricNoiseSchedule(0.01, 5.0)
K = 20  # sampler steps of the Gaussian chains


@dataclass(frozen=True)
class HalfSquare(Energy):
    """E(x) = |x|^2 / 2, so p_kT = N(0, kT I)."""

    name: str = "half_square"
    dim: int = 1

    def _energy_and_forces(self, x: torch.Tensor, want_forces: bool):
        return 0.5 * x.pow(2).sum(-1), (-x if want_forces else None)


KT0, KT = 2.0, 1.0
TEMPERING = BoltzmannReward(HalfSquare(dim=1), kT=KT, kT0=KT0)  # r = -(1/kT - 1/kT0)|x|^2/2
C_TEMPER = 1 / KT - 1 / KT0


def _exact_gradient(model: GaussianScore, pre: GaussianScore, quadratic: float, alpha: float = 1.0) -> torch.Tensor:
    mu = model.mu.detach().clone().requires_grad_(True)
    log_var = model.log_var.detach().clone().requires_grad_(True)
    j = gaussian_chain_objective(mu, log_var.exp(), pre.mu.detach(), float(pre.log_var.detach().exp()), SCHEDULE, K,
                                 quadratic=quadratic, alpha=alpha)[2]
    j.backward()
    return torch.cat([mu.grad, log_var.grad[None]])


def _pg_gradients(model, pre, reward, n_batches, batch, seed, n_sub=None, **kwargs) -> torch.Tensor:
    """Policy-gradient estimates of ∇J, one per batch: (n_batches, n_params); ``n_sub`` steps drawn
    at random per batch (None: all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        if n_sub is not None:
            kwargs["steps"] = torch.randperm(K, generator=g)[:n_sub]
        traj = sample_trajectories(model, SCHEDULE, batch, 1, K, generator=g, dtype=F64)
        kl_terms, pre_scores = path_kl_terms(traj, pre)
        model.zero_grad()
        loss = policy_gradient_surrogate(model, pre_scores, kl_terms, traj.states, traj.times, traj.increments,
                                         reward(traj.samples), 1.0, **kwargs)
        loss.backward()
        out.append(-torch.cat([model.mu.grad, model.log_var.grad[None]]))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------
# the closed form itself, against Monte Carlo chains
# ----------------------------------------------------------------------------------------


def test_gaussian_chain_closed_form_matches_sampled_chains():
    model, pre = GaussianScore([0.3], 1.5, SCHEDULE), GaussianScore([0.0], KT0, SCHEDULE)
    g = torch.Generator().manual_seed(0)
    traj = sample_trajectories(model, SCHEDULE, 100_000, 1, K, generator=g, dtype=F64)
    means, variances = gaussian_chain_moments(model.mu.detach(), model.log_var.detach().exp(), SCHEDULE, K)
    assert torch.allclose(traj.states.mean(1), means, atol=5 * float(variances.max().sqrt()) / math.sqrt(100_000))
    assert torch.allclose(traj.states.var(1)[:, 0], variances, rtol=0.02)
    er, kl, j = gaussian_chain_objective(model.mu.detach(), model.log_var.detach().exp(), pre.mu.detach(), KT0,
                                         SCHEDULE, K, quadratic=C_TEMPER)
    kl_mc = path_kl_terms(traj, pre)[0].sum(0)
    r_mc = TEMPERING(traj.samples)
    assert abs(float(r_mc.mean()) - float(er)) < 4 * float(r_mc.std()) / math.sqrt(100_000)
    assert abs(float(kl_mc.mean()) - float(kl)) < 4 * float(kl_mc.std()) / math.sqrt(100_000)
    assert float(kl) > 0.01  # a real difference between the two samplers, not a vacuous match


# ----------------------------------------------------------------------------------------
# the policy-gradient estimator against the exact gradient
# ----------------------------------------------------------------------------------------


def test_policy_gradient_is_unbiased_for_the_exact_gradient():
    model, pre = GaussianScore([0.3], 1.5, SCHEDULE), GaussianScore([0.0], KT0, SCHEDULE)
    exact = _exact_gradient(model, pre, C_TEMPER)
    grads = _pg_gradients(model, pre, TEMPERING, 20, 5000, seed=1)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(grads.shape[0])
    assert bool((se < 0.05 * exact.abs()).all()), (se, exact)  # precise enough to see a 5 % bias
    assert bool(((mean - exact).abs() < 4 * se).all()), (mean, exact, se)
    # a random subset of the steps, rescaled by K/m, is still unbiased (a fixed subset would not be)
    sub = _pg_gradients(model, pre, TEMPERING, 40, 5000, seed=2, n_sub=5)
    assert bool(((sub.mean(0) - exact).abs() < 4 * sub.std(0) / math.sqrt(40)).all())


def test_policy_gradient_baseline_and_the_dpok_approximation():
    model, pre = GaussianScore([0.3], 1.5, SCHEDULE), GaussianScore([0.0], KT0, SCHEDULE)
    exact = _exact_gradient(model, pre, C_TEMPER)
    shifted = lambda x: TEMPERING(x) + 10.0  # noqa: E731  (the same optimum: a constant does not change q*)
    with_b = _pg_gradients(model, pre, TEMPERING, 20, 5000, seed=3)
    # the leave-one-out baseline makes the estimate blind to a constant added to the reward ...
    assert torch.allclose(_pg_gradients(model, pre, shifted, 20, 5000, seed=3), with_b, atol=1e-9)
    # ... without it the estimate stays unbiased, but the constant multiplies its noise
    without_b = _pg_gradients(model, pre, shifted, 20, 5000, seed=3, baseline=False)
    assert bool(((without_b.mean(0) - exact).abs() < 4 * without_b.std(0) / math.sqrt(20)).all())
    assert float(without_b.var(0).sum()) > 5 * float(with_b.var(0).sum())  # measured: about 10x
    # DPOK drops the KL from the return: the gradient of a bound, measurably off the exact one
    dpok = _pg_gradients(model, pre, TEMPERING, 40, 5000, seed=4, kl_score_function=False)
    se = dpok.std(0) / math.sqrt(40)
    assert float(((dpok.mean(0) - exact).abs() / se).max()) > 4


def test_reward_backprop_gradient_matches_the_exact_gradient():
    model, pre = GaussianScore([0.3], 1.5, SCHEDULE), GaussianScore([0.0], KT0, SCHEDULE)
    pre.requires_grad_(False)
    exact = _exact_gradient(model, pre, C_TEMPER)
    g = torch.Generator().manual_seed(5)
    grads = []
    for _ in range(10):
        model.zero_grad()
        loss, _, _ = reward_backprop_loss(model, pre, TEMPERING, SCHEDULE, 5000, 1, K, 1.0, generator=g)
        loss.backward()
        grads.append(-torch.cat([model.mu.grad, model.log_var.grad[None]]))
    grads = torch.stack(grads)
    se = grads.std(0) / math.sqrt(10)
    assert bool((se < 0.02 * exact.abs()).all())  # pathwise gradients are far quieter than score-function ones
    assert bool(((grads.mean(0) - exact).abs() < 4 * se).all()), (grads.mean(0), exact, se)


# ----------------------------------------------------------------------------------------
# every method reaches the optimum of the tempering reward (N(0, kT0) -> N(0, kT))
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_optimum():
    """The discretised chain's optimum in the Gaussian family, and alpha log Z of its last state."""
    mu, var, j = gaussian_chain_optimum([0.0], KT0, SCHEDULE, K, quadratic=C_TEMPER)
    p_pre = float(gaussian_chain_moments(torch.zeros(1, dtype=F64), torch.tensor(KT0, dtype=F64), SCHEDULE, K)[1][-1])
    log_z = -0.5 * math.log(1 + C_TEMPER * p_pre)  # E_pre[exp(-c x^2/2)], x ~ N(0, p_pre)
    return var, j, log_z


def test_chain_optimum_is_the_tilted_gaussian(chain_optimum):
    var, j, log_z = chain_optimum
    # the family holds the tilted path measure up to the discretisation: its best J is within 0.03
    # (5 % of |log Z|) of alpha log Z, the best value over all path measures, and never above it
    assert j <= log_z + 1e-9 and log_z - j < 0.03
    # and the continuous-time optimum N(0, kT) up to the discretisation of K = 20 steps
    assert abs(var - KT) < 0.1


def _assert_reaches_optimum(model: GaussianScore, chain_optimum, tol_var: float, tol_mu: float = 0.05) -> None:
    var_opt, j_opt, _ = chain_optimum
    var = float(model.log_var.detach().exp())
    assert abs(float(model.mu.detach()[0])) < tol_mu
    assert abs(var - var_opt) < tol_var, (var, var_opt)
    j = float(gaussian_chain_objective(model.mu.detach(), model.log_var.detach().exp(), torch.zeros(1, dtype=F64),
                                       KT0, SCHEDULE, K, quadratic=C_TEMPER)[2])
    assert j_opt - j < 0.01 * abs(j_opt) + 1e-3, (j, j_opt)


def test_policy_gradient_reaches_the_chain_optimum(chain_optimum):
    pre = GaussianScore([0.0], KT0, SCHEDULE)
    config = PolicyGradientConfig(n_iterations=300, batch_size=256, sde_steps=K, lr=0.02)
    run = policy_gradient(pre, TEMPERING, SCHEDULE, 1, config, seed=0, progress=False)
    _assert_reaches_optimum(run.model, chain_optimum, tol_var=0.08)
    assert run.counter.rewards == 300 * 256
    assert run.counter.rows == 300 * iteration_cost(config)["score_rows"] == 300 * 256 * 3 * K  # sample, KL, grad
    assert run.history.final("objective", 50) > chain_optimum[1] - 0.05
    assert float(pre.log_var.detach().exp()) == pytest.approx(KT0)  # the pretrained model is untouched


@pytest.mark.parametrize("truncate, tol", [(None, 0.03), (K - 2, 0.03), (K - 5, 0.1)])
def test_reward_backprop_reaches_the_chain_optimum(chain_optimum, truncate, tol):
    pre = GaussianScore([0.0], KT0, SCHEDULE)
    config = RewardBackpropConfig(n_iterations=200, batch_size=256, sde_steps=K, lr=0.02, truncate=truncate)
    run = reward_backprop(pre, TEMPERING, SCHEDULE, 1, config, seed=0, progress=False)
    _assert_reaches_optimum(run.model, chain_optimum, tol_var=tol)
    assert run.counter.rows == 200 * iteration_cost(config)["score_rows"] == 200 * 2 * 256 * K


def test_truncated_reward_backprop_is_biased(chain_optimum):
    # through the last K/2 steps only (sigma_t < 0.2 here) the reward barely reaches the variance,
    # while every step's KL still pulls it back: the variance stays near the pretrained kT0 = 2
    pre = GaussianScore([0.0], KT0, SCHEDULE)
    config = RewardBackpropConfig(n_iterations=200, batch_size=256, sde_steps=K, lr=0.02, truncate=K // 2)
    run = reward_backprop(pre, TEMPERING, SCHEDULE, 1, config, seed=0, progress=False)
    assert float(run.model.log_var.detach().exp()) > chain_optimum[0] + 0.5


def test_reward_weighted_regression_reaches_the_tempered_target():
    g = torch.Generator().manual_seed(6)
    pool = math.sqrt(KT0) * torch.randn(40_000, 1, generator=g, dtype=F64)  # exact samples of q_pre
    model = GaussianScore([0.0], KT0, GeometricNoiseSchedule(0.01, 20.0))
    fit_score_model(model, pool, model.schedule, 400, weights=reward_weights(TEMPERING(pool)), batch_size=512,
                    lr=0.02, progress=False)
    assert abs(float(model.mu.detach()[0])) < 0.05
    assert abs(float(model.log_var.detach().exp()) - KT) < 0.08


def test_best_of_n_hits_the_tempered_target_in_two_dimensions():
    # in 2-D, E = |x|^2/2 of N(0, kT0 I) is exponential with mean kT0; the lowest of N = kT0/kT of them
    # is exponential with mean kT: best-of-N samples ARE N(0, kT I)
    kt0, kt, n = 3.0, 1.0, 3
    reward = BoltzmannReward(HalfSquare(dim=2), kT=kt, kT0=kt0)
    g = torch.Generator().manual_seed(7)
    cand = math.sqrt(kt0) * torch.randn(20_000, n, 2, generator=g, dtype=F64)
    best = best_of_n(cand, reward(cand.reshape(-1, 2)).reshape(20_000, n))
    e = torch.sort(0.5 * best.pow(2).sum(-1)).values
    ks = float((torch.arange(1, 20_001, dtype=F64) / 20_000 - (1 - torch.exp(-e / kt))).abs().max())
    assert ks < 1.63 / math.sqrt(20_000)  # Kolmogorov-Smirnov, 1 % level, against Exp(mean kT)


@pytest.mark.parametrize("rollin_model", ["student", "pretrained", "mixture"])
def test_iterative_distillation_reaches_the_tempered_target(rollin_model):
    schedule = GeometricNoiseSchedule(0.01, 20.0)
    pre = GaussianScore([0.0, 0.0], KT0, schedule)
    reward = BoltzmannReward(HalfSquare(dim=2), kT=KT, kT0=KT0)
    config = DistillationConfig(n_rounds=2, collections_per_round=1, n_states=512, n_rollouts=8,
                                steps_per_collection=150, batch_size=256, sde_steps=40, rollout_steps=20, lr=0.02,
                                rollin=rollin_model)
    result = iterative_distillation(pre, reward, schedule, 2, config, seed=0, progress=False)
    for k, snap in enumerate(result.snapshots):  # round k targets kT_k = 1 / (1/kT0 + tilt_k (1/kT - 1/kT0))
        assert torch.allclose(snap["mu"], torch.zeros(2, dtype=F64), atol=0.06)
        assert abs(float(snap["log_var"].exp()) - reward.tilted_kT(result.tilts[k])) < 0.1


# ----------------------------------------------------------------------------------------
# the mixture roll-in
# ----------------------------------------------------------------------------------------


def test_mixture_rollin_draws_half_its_states_from_each_model():
    # two well-separated models: the states of a mixture roll-in split by which model made them,
    # and each half follows that model's noised marginal N(mu, v + sigma_t^2)
    schedule = GeometricNoiseSchedule(0.01, 20.0)
    student, pre = GaussianScore([6.0], 0.5, schedule), GaussianScore([-6.0], 0.5, schedule)
    g = torch.Generator().manual_seed(8)
    x_t, t, source = rollin_states("mixture", student, pre, schedule, 4001, 1, 60, generator=g)
    assert x_t.shape == (4001, 1) and t.shape == (4001,) and source.shape == (4001,)
    assert int(source.sum()) == 2001  # the odd state goes to the student
    for flag, mu in ((True, 6.0), (False, -6.0)):
        sel = source == flag
        z = (x_t[sel, 0] - mu) / (0.5 + schedule.variance(t[sel])).sqrt()
        assert abs(float(z.mean())) < 0.1 and abs(float(z.var()) - 1) < 0.1
    only_student, _, src_s = rollin_states("student", student, pre, schedule, 100, 1, 60, generator=g)
    assert bool(src_s.all())
    frac = rollin_states("mixture", student, pre, schedule, 1000, 1, 60, generator=g, student_fraction=0.25)[2]
    assert int(frac.sum()) == 250


def test_rollin_states_agrees_with_rollin_for_one_model():
    schedule = GeometricNoiseSchedule(0.01, 20.0)
    model = GaussianScore([1.0], 0.7, schedule)
    a = rollin(model, schedule, 300, 1, 30, generator=torch.Generator().manual_seed(9))
    b = rollin_states("pretrained", model, model, schedule, 300, 1, 30, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ----------------------------------------------------------------------------------------
# the non-differentiable reward and its importance-sampled optimum
# ----------------------------------------------------------------------------------------


def test_inner_pair_reward_counts_pairs_of_hand_built_squares():
    reward = InnerPairReward(dw4())
    # squares of side s: 4 sides of length s, 2 diagonals of length s sqrt 2
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    x = torch.stack([2.5 * square, 3.0 * square, 5.0 * square]).reshape(3, 8)
    assert reward(x).tolist() == [6.0, 4.0, 0.0]  # 2.5 sqrt 2 < 4 < 3 sqrt 2
    assert InnerPairReward(dw4(), scale=0.5)(x).tolist() == [3.0, 2.0, 0.0]
    assert not reward.differentiable and reward.threshold == 4.0
    xg = x.clone().requires_grad_(True)
    assert not reward(xg).requires_grad


def test_tilted_optimum_of_a_step_reward_matches_the_exact_value():
    # q_pre = N(0, 1); r = number of thresholds below x (a piecewise-constant reward):
    # class probabilities are differences of the normal CDF, so the tilted optimum is exact
    thresholds = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=F64)
    cdf = torch.special.ndtr(torch.cat([torch.tensor([-math.inf], dtype=F64), thresholds,
                                        torch.tensor([math.inf], dtype=F64)]))
    probs, values = cdf[1:] - cdf[:-1], torch.arange(5, dtype=F64)
    for alpha in (0.5, 1.0, 2.0):
        exact = discrete_tilted_optimum(probs, values, alpha)
        x = torch.randn(400_000, generator=torch.Generator().manual_seed(10), dtype=F64)
        est = tilted_optimum((x[:, None] > thresholds).sum(-1).to(F64), alpha)
        for name in ("log_z", "reward", "kl"):
            se = getattr(est, f"{name}_se")
            assert 0 < se < 0.02
            assert abs(getattr(est, name) - exact[name]) < 4 * se, (alpha, name, getattr(est, name), exact[name], se)
        assert est.objective == pytest.approx(alpha * est.log_z)
    # brute force for the exact formula: the tilted optimum maximises E[r] - alpha KL over all class laws
    q = torch.softmax(torch.randn(2000, 5, generator=torch.Generator().manual_seed(11), dtype=F64) * 2, 1)
    objective = (q * values).sum(1) - (q * (q / probs).log()).sum(1)
    assert float(objective.max()) <= discrete_tilted_optimum(probs, values, 1.0)["objective"] + 1e-12


def test_tilted_optimum_of_the_tempering_reward_is_the_colder_gaussian():
    # x ~ N(0, kT0) in 1-D: q* = N(0, kT); log Z = 0.5 log(kT/kT0); E*[r] = -c kT/2; KL(N(0,kT)||N(0,kT0))
    x = math.sqrt(KT0) * torch.randn(400_000, 1, generator=torch.Generator().manual_seed(12), dtype=F64)
    est = tilted_optimum(TEMPERING(x))
    kl = 0.5 * (KT / KT0 - 1 - math.log(KT / KT0))
    assert abs(est.log_z - 0.5 * math.log(KT / KT0)) < 4 * est.log_z_se
    assert abs(est.reward + C_TEMPER * KT / 2) < 4 * est.reward_se
    assert abs(est.kl - kl) < 4 * est.kl_se and est.kl_se < 0.01


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, match", [
    (lambda: PolicyGradientConfig(grad_steps=60, sde_steps=50), "grad_steps = 60 exceeds"),
    (lambda: PolicyGradientConfig(batch_size=1), "batch_size >= 2"),
    (lambda: PolicyGradientConfig(alpha=0.0), "alpha must be a positive"),
    (lambda: RewardBackpropConfig(truncate=0), "truncate must be a positive int"),
    (lambda: reward_backprop(GaussianScore([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 1.0, SCHEDULE),
                             InnerPairReward(dw4()), SCHEDULE, 8, RewardBackpropConfig(n_iterations=1),
                             progress=False), "not differentiable"),
    (lambda: reward_backprop_loss(GaussianScore([0.0], 1.0, SCHEDULE), GaussianScore([0.0], 1.0, SCHEDULE),
                                  lambda x: (x[:, 0] > 0).to(x.dtype), SCHEDULE, 4, 1, 3, 1.0),
     "needs a differentiable reward"),
    (lambda: policy_gradient(GaussianScore([0.0], 1.0, SCHEDULE), lambda x: x[:2, 0], SCHEDULE, 1,
                             PolicyGradientConfig(n_iterations=1, batch_size=4, sde_steps=3), progress=False),
     "returned 2 values for 4 states"),
    (lambda: tilted_optimum(torch.zeros(1)), "at least 2 samples"),
    (lambda: discrete_tilted_optimum(torch.tensor([0.5, 0.6]), torch.zeros(2)), "sum to 1"),
    (lambda: InnerPairReward(HalfSquare(dim=2)), "needs a PairPotential"),
    (lambda: rollin_states("teacher", None, None, SCHEDULE, 4, 1, 3), "unknown roll-in model"),
    (lambda: rollin_states("mixture", None, None, SCHEDULE, 4, 1, 3, student_fraction=1.5), "student_fraction"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(FinetuneInputError, match=match):
        call()
