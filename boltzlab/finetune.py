r"""Reward-guided fine-tuning of a diffusion sampler (chapter 08).

**The problem.** A pretrained diffusion model samples ``q0``; a reward ``r(x)`` says what we
want more of. KL-regularised fine-tuning maximises

    J(q) = E_q[r] - alpha KL(q || q0),   whose maximiser is   q*_alpha(x) ∝ q0(x) exp(r(x) / alpha).

**A reward with an exact answer.** Pretrain on a Boltzmann density at a high temperature
kT0 and take :class:`BoltzmannReward`, r(x) = -(1/kT - 1/kT0) E(x). Then
p_kT0 · exp(lambda r) is the Boltzmann density at inverse temperature
beta0 + lambda (beta - beta0) (:meth:`BoltzmannReward.tilted_kT`): at alpha = 1 the optimum is
exactly p_kT, and every method can be scored against exact samples and an exact density.

**Iterative distillation** (:func:`iterative_distillation`). Round k has a frozen teacher
tau_k (at first the pretrained model) and a tilt 1/alpha_k:

1. *roll-in* (off-policy): run the reverse SDE of the student (or of the pretrained model)
   from t = 1 and stop at a random time t: states x_t (:func:`rollin`);
2. *roll-out*: from each x_t draw M completions x_0^(m) with the teacher's reverse SDE
   (:func:`rollout`), i.e. samples of the teacher's posterior tau(x_0 | x_t);
3. *soft-optimal weights*: w_m = softmax_m(r(x_0^(m)) / alpha_k), soft value
   V(x_t) = alpha_k log (1/M) sum_m exp(r(x_0^(m)) / alpha_k) (:func:`soft_optimal_weights`).
   The tilted posterior p*(x_0 | x_t) ∝ tau(x_0 | x_t) exp(r(x_0)/alpha_k) is the posterior of
   the tilted density tau · exp(r/alpha_k), whose noised score is, by Tweedie's formula,

       ∇ log p*_t(x_t) = (E_{p*}[x_0 | x_t] - x_t) / sigma_t^2 = ∇ log tau_t(x_t) + ∇ V(x_t) / alpha_k,

   estimated by :func:`tilted_score_target` as s_tau(x_t, t) + Δ / sigma_t^2 with the
   leave-one-out weighted shift Δ = sum_m w_m (x_0^(m) - mean_{m' != m} x_0^(m')) (the
   teacher's score is a control variate; the baseline removes the first-order bias of
   self-normalised weights);
4. *forward-KL distillation*: regress the student onto that target,
   L = E_{(x_t, t) ~ roll-in} sigma_t^2 || s_theta(x_t, t) - target ||^2
   (:func:`score_regression_loss`). By Girsanov, the KL between the path measures of the
   tilted teacher and the student is (1/2) ∫ g(t)^2 E|| s* - s_theta ||^2 dt, so this is the
   forward KL distilled state by state; its minimiser is s* wherever the roll-in puts mass,
   whichever model produced the states: that is why the roll-in may be off-policy;
5. *teacher refresh*: at the end of the round the teacher becomes a copy of the student.

Refreshing changes the fixed point: round k distils tau_k · exp(r/alpha_k) and the next
round starts from it, so after K rounds the student targets q0 · exp(r sum_k 1/alpha_k).
Keeping alpha_k = 1 would compound to exp(K r) (too cold). :func:`tempering_alphas` picks
alpha_k with sum_k 1/alpha_k = 1/alpha_total, e.g. alpha_k = K for an exact overall tilt
exp(r): a tempering curriculum kT0 -> ... -> kT (:func:`composed_alpha` checks it).

**Baselines.** :func:`best_of_n` keeps the best of N pretrained samples; its density is
N q0(x) F(r(x))^{N-1} with F the CDF of r under q0 (:func:`best_of_n_grid_probs`, on a
grid) and KL(best-of-N || q0) = log N - (N - 1)/N (:func:`best_of_n_kl`): a sharpened q0, not
q0 · exp(r). Reward-weighted regression fits the model by denoising score matching on
pretrained samples resampled with self-normalised weights exp(r/alpha)
(:func:`fit_score_model` with ``weights``; :func:`reward_weights`).

Also here: :class:`PreconditionedScore` (a score network with O(1) inputs and outputs at every
noise level), :func:`fit_score_model` (denoising score matching, optionally weighted: pretraining
and RWR), :func:`grid_kl` (KL between densities on a quadrature grid). Score functions follow
:mod:`boltzlab.diffusion`: ``score(x (B, dim), t (B,)) -> (B, dim)``. Bad input raises
:class:`FinetuneInputError` (a ``ValueError``) naming the problem.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from boltzlab.diffusion import (
    GeometricNoiseSchedule,
    _identity,
    Projection,
    ScoreFn,
    denoising_score_matching_loss,
    reverse_sde_sample,
    sample_prior,
)
from boltzlab.energies import Energy
from boltzlab.training import TrainingHistory, run_training

__all__ = [
    "BoltzmannReward",
    "DistillationConfig",
    "DistillationResult",
    "FinetuneInputError",
    "PreconditionedScore",
    "best_of_n",
    "best_of_n_grid_probs",
    "best_of_n_kl",
    "composed_alpha",
    "fit_score_model",
    "grid_kl",
    "iterative_distillation",
    "reward_weights",
    "rollin",
    "rollout",
    "score_regression_loss",
    "soft_optimal_weights",
    "tempering_alphas",
    "tilted_score_target",
]

Reward = Callable[[Tensor], Tensor]
ROLLIN_MODELS = ("student", "pretrained", "mixture")


class FinetuneInputError(ValueError):
    """Raised for bad shapes, non-finite rewards, bad temperatures, alphas or sizes."""


# ----------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FinetuneInputError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise FinetuneInputError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _tensor(x: object, ndim: int, name: str, shape_text: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise FinetuneInputError(f"{name} must be a floating torch.Tensor of shape {shape_text}, got "
                                 f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if x.ndim != ndim:
        raise FinetuneInputError(f"{name} must have shape {shape_text}, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise FinetuneInputError(f"{name} contains {int((~torch.isfinite(x)).sum())} NaN or infinite value(s)")
    return x


# ----------------------------------------------------------------------------------------
# the score model
# ----------------------------------------------------------------------------------------


class PreconditionedScore(nn.Module):
    r"""A score network with O(1) inputs and outputs at every noise level:

        s(x, t) = -x / c_t^2 + net(x / c_t, t) / c_t,    c_t = sqrt(sigma_t^2 + sigma_d^2).

    The first term is the exact noised score of N(0, sigma_d^2 I), so ``net`` only learns
    the correction. Without it a plain MLP must output scores that shrink like 1/sigma_t^2
    over four decades of noise (sigma_max = 20 down to 0.01), and trains much worse on
    the same budget. ``net(x, t)``: e.g. :class:`boltzlab.models.ScoreMLP`;
    ``data_std``: sigma_d, about the standard deviation of the data. ``(B, dim), (B,) -> (B, dim)``.

    ``input_limit`` = L passes u = L tanh((x/c_t)/L) to the network instead of x/c_t (a smooth,
    invertible clamp; None switches it off). Far outside the data an MLP's output grows
    linearly, which can turn the confining -x/c_t^2 into a repelling term; likelihoods by
    the probability-flow ODE (which carries a point outwards, from data to noise) then blow
    up for points in the tails. With the clamp the correction stays bounded and the tails
    stay Gaussian.
    """

    def __init__(self, net: nn.Module, schedule: GeometricNoiseSchedule, data_std: float,
                 input_limit: float | None = 5.0) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.data_std = _positive_float(data_std, "data_std")
        self.input_limit = None if input_limit is None else _positive_float(input_limit, "input_limit")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c = (self.schedule.variance(t) + self.data_std**2).sqrt()[:, None]
        u = x / c
        if self.input_limit is not None:  # smooth clamp: no linear extrapolation far from the data
            u = self.input_limit * torch.tanh(u / self.input_limit)
        return -x / c**2 + self.net(u, t) / c


# ----------------------------------------------------------------------------------------
# the reward with an exact answer
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoltzmannReward:
    r"""r(x) = -(1/kT - 1/kT0) E(x): tilting p_kT0 by exp(r) gives p_kT exactly.

    ``energy`` is any :class:`~boltzlab.energies.Energy` (its own kT is ignored). Calling the
    reward on ``x`` of shape ``(B, dim)`` returns ``(B,)``.
    """

    energy: Energy
    kT: float
    kT0: float

    def __post_init__(self) -> None:
        _positive_float(self.kT, "kT")
        _positive_float(self.kT0, "kT0")

    @property
    def coefficient(self) -> float:
        """1/kT - 1/kT0 (positive when fine-tuning towards a colder target)."""
        return 1.0 / self.kT - 1.0 / self.kT0

    def __call__(self, x: Tensor) -> Tensor:
        return -self.coefficient * self.energy.energy(x)

    def tilted_kT(self, tilt: float) -> float:
        r"""kT of p_kT0 · exp(tilt · r): 1 / (1/kT0 + tilt (1/kT - 1/kT0)); tilt = 1 gives kT."""
        beta = 1.0 / self.kT0 + float(tilt) * self.coefficient
        if not beta > 0:
            raise FinetuneInputError(f"tilt {tilt} gives a non-positive inverse temperature {beta}")
        return 1.0 / beta


# ----------------------------------------------------------------------------------------
# soft-optimal weights and the tilt schedule
# ----------------------------------------------------------------------------------------


def soft_optimal_weights(rewards: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    r"""Soft-optimal roll-out weights and the soft value of each roll-in state.

    ``rewards`` of shape ``(B, M)``: r(x_0^(m)) of M completions of each of B states. Returns

        w_bm = exp(r_bm / alpha) / sum_m' exp(r_bm' / alpha)                  shape (B, M)
        V_b  = alpha log( (1/M) sum_m exp(r_bm / alpha) )                     shape (B,)

    both by logsumexp, so rewards of any size are fine. V is the Monte Carlo soft value
    alpha log E_tau[exp(r(x_0)/alpha) | x_t]: it lies between the mean reward (alpha -> inf)
    and the best reward (alpha -> 0).
    """
    r = _tensor(rewards, 2, "rewards", "(B, M)")
    alpha = _positive_float(alpha, "alpha")
    scaled = r / alpha
    lse = torch.logsumexp(scaled, dim=1)
    weights = torch.exp(scaled - lse[:, None])
    value = alpha * (lse - math.log(r.shape[1]))
    return weights, value


def tempering_alphas(n_rounds: int, alpha_total: float = 1.0) -> tuple[float, ...]:
    r"""Per-round alphas alpha_k = n_rounds · alpha_total, so that sum_k 1/alpha_k = 1/alpha_total.

    With a teacher refresh after every round the tilts compose,
    q0 · prod_k exp(r/alpha_k) = q0 · exp(r/alpha_total); for the Boltzmann reward, round k ends
    at the inverse temperature beta0 + (k/K)(beta - beta0) / alpha_total: a tempering curriculum.
    """
    n_rounds = _positive_int(n_rounds, "n_rounds")
    alpha_total = _positive_float(alpha_total, "alpha_total")
    return tuple(n_rounds * alpha_total for _ in range(n_rounds))


def composed_alpha(alphas: Sequence[float]) -> float:
    r"""The alpha of the composed tilt prod_k exp(r/alpha_k) = exp(r/alpha): 1 / sum_k 1/alpha_k."""
    if len(alphas) == 0:
        raise FinetuneInputError("alphas is empty: give one alpha per round")
    return 1.0 / sum(1.0 / _positive_float(a, f"alphas[{k}]") for k, a in enumerate(alphas))


# ----------------------------------------------------------------------------------------
# roll-in, roll-out, target and loss
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def rollin(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    n: int,
    dim: int,
    n_steps: int,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Off-policy roll-in: states x_t of the reverse SDE of ``score``, each stopped at its own time.

    One reverse-SDE trajectory per state on the grid t_j = 1 - j/n_steps; state b is read at a
    uniformly drawn step j_b in {0, ..., n_steps - 1} (so t in {1, ..., 1/n_steps}, never 0).
    Returns ``(x_t (n, dim), t (n,))``.
    """
    n, dim, n_steps = _positive_int(n, "n"), _positive_int(dim, "dim"), _positive_int(n_steps, "n_steps")
    x1 = sample_prior(schedule, n, dim, project=project, generator=generator)
    _, path = reverse_sde_sample(score, schedule, x1, n_steps, project=project, generator=generator,
                                 return_trajectory=True)
    j = torch.randint(n_steps, (n,), generator=generator)
    t = 1.0 - j.to(x1.dtype) / n_steps
    return path[j, torch.arange(n)], t


def _score_and_jacobian_diagonal(score: ScoreFn, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """s(x, t) and the diagonal ∂s_i/∂x_i, both (B, dim), by one backward pass per coordinate."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        s = score(xg, t)
        diag = torch.stack([torch.autograd.grad(s[:, i].sum(), xg, retain_graph=i < x.shape[1] - 1)[0][:, i]
                            for i in range(x.shape[1])], dim=1)
    return s.detach(), diag


@torch.no_grad()
def rollout(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    x_t: Tensor,
    t: Tensor,
    n_steps: int,
    *,
    n_rollouts: int = 1,
    moment_matched: bool = False,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Completions x_0 of the reverse SDE of ``score`` started at (x_t, t), each state its own time.

    Euler-Maruyama like :func:`boltzlab.diffusion.reverse_sde_sample`, but on a per-state time
    grid s_k = t_b (1 - k/n_steps), k = 0..n_steps (states at different times advance
    together), and with the exact integral of g^2 over each step in place of g(s_k)^2 dt:

        x <- x + Δ_k s(x, s_k) + sqrt(Δ_k) z,   Δ_k = sigma_{s_k}^2 - sigma_{s_{k+1}}^2.

    On the geometric schedule g^2 grows like r^{2t}, so g(s_k)^2 dt overstates Δ_k by about
    1 + log(r) dt (38 % for 20 steps from t = 1 with r = 2000). Even with Δ_k the scheme
    spreads the completions too much when the steps are coarse (for a Gaussian target the
    exact noise variance is Δ_k (v + sigma_{s_{k+1}}^2) / (v + sigma_{s_k}^2) < Δ_k), and a too wide
    posterior overstates the tilt estimated from it; the error shrinks only like 1/n_steps.

    ``moment_matched=True`` fixes this: by second-order Tweedie the exact reverse transition
    has mean x + Δ_k s and covariance Δ_k (I + Δ_k ∇s) (for any data distribution), and the
    step draws from the Gaussian with that mean and the diagonal of that covariance, with
    ∂s_i/∂x_i by autograd (one backward pass per coordinate: for low dimension). It is exact
    for Gaussians with diagonal covariance at any step size and much more accurate with
    few steps otherwise.

    ``x_t`` (B, dim), ``t`` (B,) in (0, 1]; returns ``(B, n_rollouts, dim)`` (M = ``n_rollouts``
    independent completions per state).
    """
    x_t = _tensor(x_t, 2, "x_t", "(B, dim)")
    t = _tensor(t, 1, "t", "(B,)")
    if t.shape[0] != x_t.shape[0]:
        raise FinetuneInputError(f"t has {t.shape[0]} times for {x_t.shape[0]} states")
    if bool(((t <= 0) | (t > 1)).any()):
        raise FinetuneInputError("roll-out times must lie in (0, 1]")
    n_steps, m = _positive_int(n_steps, "n_steps"), _positive_int(n_rollouts, "n_rollouts")
    project = project or _identity
    b, dim = x_t.shape
    x = x_t.repeat_interleave(m, dim=0)  # (B M, dim), the M copies of state b are rows b M .. b M + M - 1
    start = t.to(x.dtype).repeat_interleave(m)
    dt = start / n_steps
    for k in range(n_steps):
        s_hi = start - k * dt
        s_lo = (start - (k + 1) * dt).clamp_min(0.0)
        step_var = (schedule.variance(s_hi) - schedule.variance(s_lo))[:, None]  # = ∫ g^2 over the step
        z = project(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
        if moment_matched:
            s, jac_diag = _score_and_jacobian_diagonal(score, x, s_hi)
            noise_var = (step_var * (1.0 + step_var * jac_diag)).clamp_min(0.0)
        else:
            s, noise_var = score(x, s_hi), step_var
        x = project(x + step_var * s + noise_var.sqrt() * z)
    return x.reshape(b, m, dim)


def tilted_score_target(
    x_t: Tensor,
    t: Tensor,
    completions: Tensor,
    rewards: Tensor,
    alpha: float,
    schedule: GeometricNoiseSchedule,
    teacher_score: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The distillation target: the noised score of the tilted teacher at (x_t, t).

    Tweedie's formula for the tilted posterior p*(x_0 | x_t) ∝ tau(x_0 | x_t) e^{r(x_0)/alpha}:

        ∇ log (tau · e^{r/alpha})_t (x_t) = ( E_{p*}[x_0 | x_t] - x_t ) / sigma_t^2
                                          = ∇ log tau_t(x_t) + ( E_{p*}[x_0] - E_tau[x_0] ) / sigma_t^2,

    the second line being ∇ log tau_t + ∇V/alpha. From completions x_0^(m) ~ tau(x_0 | x_t) and
    w = :func:`soft_optimal_weights`, the shift of the mean is estimated with a leave-one-out
    baseline,

        Δ = sum_m w_m (x_0^(m) - mean_{m' != m} x_0^(m')) = M/(M-1) · sum_m (w_m - 1/M) x_0^(m),

    which, unlike the plain self-normalised sum_m w_m x_0^(m) - mean_m x_0^(m), has no bias at
    first order in the tilt (the plain one shrinks the tilt by (M-1)/M; over many rounds that
    adds up). The target is then

        target = ( mean_m x_0^(m) + Δ - x_t ) / sigma_t^2                 (no teacher_score)
        target = s_tau(x_t, t) + Δ / sigma_t^2                            (control variate)

    The second form uses the teacher's own score for the untilted part (equal in expectation
    when the teacher is self-consistent); its Monte Carlo noise vanishes as the tilt 1/alpha -> 0,
    while the first form's noise is the posterior spread of x_0 at every tilt (large at large t).

    ``x_t`` (B, dim), ``t`` (B,), ``completions`` (B, M, dim) with M >= 2, ``rewards`` (B, M),
    ``teacher_score`` (B, dim) or None. Returns ``(target (B, dim), value (B,), ess (B,))`` with
    ess = 1 / sum_m w_m^2 the Kish ESS of each state's weights (between 1 and M).
    """
    x_t = _tensor(x_t, 2, "x_t", "(B, dim)")
    t = _tensor(t, 1, "t", "(B,)")
    completions = _tensor(completions, 3, "completions", "(B, M, dim)")
    b, m, dim = completions.shape
    if x_t.shape != (b, dim) or t.shape != (b,) or tuple(rewards.shape) != (b, m):
        raise FinetuneInputError(
            f"inconsistent shapes: x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, completions {(b, m, dim)}, "
            f"rewards {tuple(rewards.shape)}; expected ({b}, {dim}), ({b},), (B, M, dim), ({b}, {m})"
        )
    var = schedule.variance(t)
    if bool((var <= 0).any()):
        raise FinetuneInputError("t must be > 0: at t = 0 the noise variance is 0 and the target undefined")
    if m < 2:
        raise FinetuneInputError(f"need M >= 2 completions per state to estimate the tilt, got M = {m}")
    weights, value = soft_optimal_weights(rewards, alpha)
    # leave-one-out baseline: sum_m w_m (x_m - mean_{m' != m} x_m') = M/(M-1) sum_m (w_m - 1/M) x_m
    shift = m / (m - 1) * ((weights - 1.0 / m)[..., None] * completions).sum(1)
    if teacher_score is None:
        target = (completions.mean(1) + shift - x_t) / var[:, None]
    else:
        teacher_score = _tensor(teacher_score, 2, "teacher_score", "(B, dim)")
        if teacher_score.shape != x_t.shape:
            raise FinetuneInputError(f"teacher_score has shape {tuple(teacher_score.shape)}, expected {(b, dim)}")
        target = teacher_score + shift / var[:, None]
    return target, value, 1.0 / weights.pow(2).sum(1)


def score_regression_loss(score: ScoreFn, x_t: Tensor, t: Tensor, target: Tensor,
                          schedule: GeometricNoiseSchedule) -> Tensor:
    r"""L = mean_b sigma_{t_b}^2 || s(x_t, t) - target ||^2 (the weighting of DSM): a scalar."""
    residual = schedule.std(t)[:, None] * (score(x_t, t) - target)
    return residual.pow(2).sum(-1).mean()


# ----------------------------------------------------------------------------------------
# iterative distillation
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillationConfig:
    """Sizes and settings of :func:`iterative_distillation`.

    A round is ``collections_per_round`` collections; each collection draws ``n_states``
    roll-in states with ``n_rollouts`` completions each, then takes ``steps_per_collection``
    Adam steps on minibatches of ``batch_size`` of those (state, target) pairs. The teacher is
    refreshed after every round. ``alphas`` (one per round) defaults to
    ``tempering_alphas(n_rounds, alpha_total)``. ``rollin``: which model's reverse SDE makes the
    roll-in states (``"student"``, ``"pretrained"``, or ``"mixture"``: half each).
    ``control_variate``: use the teacher's score for the untilted part of the target (see
    :func:`tilted_score_target`); ``moment_matched``: moment-matched roll-out steps (see
    :func:`rollout`).
    """

    n_rounds: int = 4
    alpha_total: float = 1.0
    alphas: tuple[float, ...] | None = None
    collections_per_round: int = 2
    n_states: int = 1024
    n_rollouts: int = 16
    steps_per_collection: int = 300
    batch_size: int = 256
    sde_steps: int = 100
    rollout_steps: int = 50
    lr: float = 1e-3
    rollin: str = "student"
    control_variate: bool = True
    moment_matched: bool = True

    def __post_init__(self) -> None:
        for name in ("n_rounds", "collections_per_round", "n_states", "n_rollouts", "steps_per_collection",
                     "batch_size", "sde_steps", "rollout_steps"):
            _positive_int(getattr(self, name), name)
        _positive_float(self.alpha_total, "alpha_total")
        _positive_float(self.lr, "lr")
        if self.rollin not in ROLLIN_MODELS:
            raise FinetuneInputError(f"unknown roll-in model {self.rollin!r}; choose one of {', '.join(ROLLIN_MODELS)}")
        if self.alphas is not None:
            if len(self.alphas) != self.n_rounds:
                raise FinetuneInputError(f"alphas has {len(self.alphas)} entries for {self.n_rounds} rounds")
            composed_alpha(self.alphas)

    def round_alphas(self) -> tuple[float, ...]:
        """alpha_k of each round: ``alphas`` if given, else :func:`tempering_alphas`."""
        return tuple(self.alphas) if self.alphas is not None else tempering_alphas(self.n_rounds, self.alpha_total)

    def score_evaluations(self, dim: int) -> int:
        """Score-network passes spent on sampling (not training), counting a backward pass as
        one: per collection, n_states roll-in trajectories of sde_steps, n_states * n_rollouts
        roll-outs of rollout_steps (1 + dim passes per step when moment-matched), and one
        teacher evaluation per state for the control variate."""
        per_step = 1 + dim if self.moment_matched else 1
        per = self.n_states * (self.sde_steps + self.n_rollouts * self.rollout_steps * per_step
                               + int(self.control_variate))
        return self.n_rounds * self.collections_per_round * per


@dataclass
class DistillationResult:
    """What :func:`iterative_distillation` returns.

    ``model``: the fine-tuned student; ``snapshots[k]``: its ``state_dict`` at the end of round
    k (load into a copy of the pretrained model to evaluate round by round); ``alphas``: alpha
    per round; ``tilts[k]`` = sum_{j<=k} 1/alpha_j, the tilt of q0 that round k targets;
    ``history``: per-step ``loss``, ``weight_ess`` (mean Kish ESS of the roll-out weights of
    the current collection, out of M) and ``value`` (mean soft value).
    """

    model: nn.Module
    snapshots: list[dict[str, Tensor]]
    alphas: tuple[float, ...]
    tilts: list[float]
    history: TrainingHistory = field(default_factory=TrainingHistory)


def _frozen_copy(model: nn.Module) -> nn.Module:
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    return clone.eval()


def iterative_distillation(
    pretrained: nn.Module,
    reward: Reward,
    schedule: GeometricNoiseSchedule,
    dim: int,
    config: DistillationConfig,
    *,
    project: Projection | None = None,
    seed: int = 0,
    progress: bool = True,
) -> DistillationResult:
    r"""Fine-tune a copy of ``pretrained`` (a score model ``(x, t) -> (B, dim)``) by iterative
    distillation (module docstring): roll-in, roll-out with the teacher, soft-optimal weights,
    score regression onto the tilted target, teacher refresh after each round.

    ``reward``: ``(B, dim) -> (B,)``. The final student targets q0 · exp(r / alpha_total) when
    the per-round alphas compose to alpha_total (the default schedule does). Seeded by ``seed``.
    """
    dim = _positive_int(dim, "dim")
    alphas = config.round_alphas()
    generator = torch.Generator().manual_seed(seed)
    student = copy.deepcopy(pretrained).train()
    student.requires_grad_(True)
    frozen_pretrained = _frozen_copy(pretrained)
    teacher = _frozen_copy(pretrained)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr)
    steps_per_round = config.collections_per_round * config.steps_per_collection
    snapshots: list[dict[str, Tensor]] = []
    tilts = [sum(1.0 / a for a in alphas[: k + 1]) for k in range(len(alphas))]
    state: dict[str, Tensor | float] = {}

    def collect(round_k: int) -> None:
        n = config.n_states
        if config.rollin == "student":
            x_t, t = rollin(student, schedule, n, dim, config.sde_steps, project=project, generator=generator)
        elif config.rollin == "pretrained":
            x_t, t = rollin(frozen_pretrained, schedule, n, dim, config.sde_steps, project=project,
                            generator=generator)
        else:
            half = n // 2
            xa, ta = rollin(student, schedule, n - half, dim, config.sde_steps, project=project, generator=generator)
            xb, tb = (rollin(frozen_pretrained, schedule, half, dim, config.sde_steps, project=project,
                             generator=generator) if half else (xa[:0], ta[:0]))
            x_t, t = torch.cat([xa, xb]), torch.cat([ta, tb])
        completions = rollout(teacher, schedule, x_t, t, config.rollout_steps, n_rollouts=config.n_rollouts,
                              moment_matched=config.moment_matched, project=project, generator=generator)
        with torch.no_grad():
            rewards = reward(completions.reshape(-1, dim)).reshape(n, config.n_rollouts)
            teacher_score = teacher(x_t, t) if config.control_variate else None
        target, value, ess = tilted_score_target(x_t, t, completions, rewards, alphas[round_k], schedule,
                                                 teacher_score)
        state.update(x_t=x_t, t=t, target=target, ess=float(ess.mean()), value=float(value.mean()))

    def step(k: int) -> dict[str, float]:
        nonlocal teacher
        round_k = k // steps_per_round
        if k > 0 and k % steps_per_round == 0:  # end of a round: snapshot, refresh the teacher
            snapshots.append(copy.deepcopy(student.state_dict()))
            teacher = _frozen_copy(student)
        if k % config.steps_per_collection == 0:
            collect(round_k)
        x_t, t, target = state["x_t"], state["t"], state["target"]
        assert isinstance(x_t, Tensor) and isinstance(t, Tensor) and isinstance(target, Tensor)
        idx = torch.randint(x_t.shape[0], (config.batch_size,), generator=generator)
        loss = score_regression_loss(student, x_t[idx], t[idx], target[idx], schedule)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item(), "weight_ess": float(state["ess"]), "value": float(state["value"])}

    history = run_training(step, config.n_rounds * steps_per_round, progress=progress, desc="iterative distillation")
    snapshots.append(copy.deepcopy(student.state_dict()))
    return DistillationResult(model=student.eval(), snapshots=snapshots, alphas=alphas, tilts=tilts, history=history)


# ----------------------------------------------------------------------------------------
# reward-weighted regression and plain pretraining
# ----------------------------------------------------------------------------------------


def reward_weights(rewards: Tensor, alpha: float = 1.0) -> Tensor:
    r"""Self-normalised weights w_i = exp(r_i/alpha) / sum_j exp(r_j/alpha) of samples x_i ~ q0: ``(n,) -> (n,)``.

    sum_i w_i f(x_i) estimates E_{q0 e^{r/alpha}}[f]: reward-weighted regression fits the model
    to this reweighted sample.
    """
    r = _tensor(rewards, 1, "rewards", "(n,)")
    return torch.softmax(r / _positive_float(alpha, "alpha"), dim=0)


def fit_score_model(
    model: nn.Module,
    data: Tensor,
    schedule: GeometricNoiseSchedule,
    n_steps: int,
    *,
    weights: Tensor | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    t_min: float = 1e-3,
    project: Projection | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "denoising score matching",
) -> TrainingHistory:
    r"""Train ``model`` in place by denoising score matching on ``data`` (n, dim).

    Minibatches are drawn uniformly (pretraining) or, with ``weights`` (n,), with probability
    proportional to them, so the loss is sum_i w_i L_DSM(x_i) / sum_i w_i: with
    w = :func:`reward_weights` this is reward-weighted regression, whose minimiser is the
    score of the reweighted (tilted) sample. Adam with learning rate ``lr``, cosine-decayed to
    zero. Returns the history (``loss`` per step).
    """
    data = _tensor(data, 2, "data", "(n, dim)")
    n_steps, batch_size = _positive_int(n_steps, "n_steps"), _positive_int(batch_size, "batch_size")
    if weights is not None:
        weights = _tensor(weights, 1, "weights", "(n,)")
        if weights.shape[0] != data.shape[0]:
            raise FinetuneInputError(f"weights has {weights.shape[0]} entries for {data.shape[0]} samples")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise FinetuneInputError("weights must be non-negative with a positive sum")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=_positive_float(lr, "lr"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)
    model.train()

    def step(_: int) -> dict[str, float]:
        if weights is None:
            idx = torch.randint(data.shape[0], (batch_size,), generator=generator)
        else:
            idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        loss = denoising_score_matching_loss(model, data[idx], schedule, project=project, generator=generator,
                                             t_min=t_min)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return {"loss": loss.item()}

    history = run_training(step, n_steps, progress=progress, desc=desc)
    model.eval()
    return history


# ----------------------------------------------------------------------------------------
# best-of-N
# ----------------------------------------------------------------------------------------


def best_of_n(candidates: Tensor, rewards: Tensor) -> Tensor:
    r"""Keep the highest-reward candidate of each group: ``(B, N, dim), (B, N) -> (B, dim)``.

    If the candidates are i.i.d. from q0, the result has density N q0(x) F(r(x))^{N-1}, with
    F the CDF of r(x), x ~ q0 (for a continuous reward).
    """
    candidates = _tensor(candidates, 3, "candidates", "(B, N, dim)")
    rewards = _tensor(rewards, 2, "rewards", "(B, N)")
    if tuple(rewards.shape) != tuple(candidates.shape[:2]):
        raise FinetuneInputError(f"rewards has shape {tuple(rewards.shape)}, expected {tuple(candidates.shape[:2])}")
    best = rewards.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0]), best]


def best_of_n_grid_probs(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    r"""The exact best-of-N distribution over the cells of a grid.

    ``probs`` (G,): the mass q0 puts on each cell (summing to 1); ``rewards`` (G,): r at each
    cell. Sorting cells by reward with cumulative mass F_i (F_0 = 0), the best of N draws
    falls in cell i with probability F_i^N - F_{i-1}^N (the discrete version of
    N q0 F^{N-1}). Cells with equal rewards share their block's mass in proportion to probs.
    Returns (G,), summing to 1.
    """
    probs = _tensor(probs, 1, "probs", "(G,)").to(torch.float64)
    rewards = _tensor(rewards, 1, "rewards", "(G,)")
    n = _positive_int(n, "n")
    if probs.shape != rewards.shape:
        raise FinetuneInputError(f"probs {tuple(probs.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    if bool((probs < 0).any()) or abs(float(probs.sum()) - 1.0) > 1e-6:
        raise FinetuneInputError(f"probs must be non-negative and sum to 1, got sum {float(probs.sum()):.6g}")
    order = torch.argsort(rewards.to(torch.float64), stable=True)
    sorted_r = rewards[order]
    cum = torch.cumsum(probs[order], 0).clamp(max=1.0)
    # ties: every cell of a block of equal rewards uses the block's lower and upper F
    _, inverse, counts = torch.unique_consecutive(sorted_r, return_inverse=True, return_counts=True)
    upper = cum[torch.cumsum(counts, 0) - 1][inverse]
    block_mass = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, inverse, probs[order])
    lower = (upper - block_mass[inverse]).clamp(min=0.0)
    share = torch.where(block_mass[inverse] > 0, probs[order] / block_mass[inverse], torch.zeros_like(cum))
    out_sorted = (upper.pow(n) - lower.pow(n)) * share
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def best_of_n_kl(n: int) -> float:
    r"""KL(best-of-N || q0) = log N - (N - 1)/N for a continuous reward (any q0, any r)."""
    n = _positive_int(n, "n")
    return math.log(n) - (n - 1) / n


# ----------------------------------------------------------------------------------------
# grid measures
# ----------------------------------------------------------------------------------------


def grid_kl(log_p: Tensor, log_q: Tensor) -> float:
    r"""KL(p || q) = sum_i p_i (log p_i - log q_i) between two distributions over the same grid cells.

    ``log_p``, ``log_q`` (G,): log densities at the cell centres of an equal-area grid (any
    additive constant; each is normalised over the cells by a log-softmax, so the result is
    the KL between the two distributions restricted to the grid). Works in log space, so
    densities of 1e-300 are fine; -inf marks an empty cell (p_i = 0 contributes 0; q_i = 0
    where p_i > 0 gives inf).
    """
    for name, v in (("log_p", log_p), ("log_q", log_q)):
        if not isinstance(v, Tensor) or v.ndim != 1 or not v.is_floating_point():
            raise FinetuneInputError(f"{name} must be a floating tensor of shape (G,), got {getattr(v, 'shape', v)!r}")
        if bool(torch.isnan(v).any()) or bool((v == math.inf).any()):
            raise FinetuneInputError(f"{name} contains NaN or +inf")
    if log_p.shape != log_q.shape:
        raise FinetuneInputError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ in shape")
    lp = torch.log_softmax(log_p.to(torch.float64), 0)
    lq = torch.log_softmax(log_q.to(torch.float64), 0)
    mask = lp > -math.inf
    if bool((lq[mask] == -math.inf).any()):
        return math.inf
    return float((lp[mask].exp() * (lp[mask] - lq[mask])).sum())
