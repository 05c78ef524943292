r"""On-policy baselines that treat the sampler as a policy: policy gradient with a KL penalty
(DDPO, Black et al. 2023; DPOK, Fan et al. 2023) and direct reward backpropagation (DRaFT,
Clark et al. 2023), both on the objective

    J(theta) = E_{P_theta}[ r(x_K) ] - alpha KL(P_theta || P_pre)
             = E_{P_theta}[ r(x_K) - alpha sum_k KL_k(x_k; theta) ],   KL_k = (Δ_k/2)|P(s_theta - s_pre)|^2,

over paths of the discretised reverse SDE (:mod:`boltzlab.finetune.chain`). Its maximiser is
P_pre exp(r(x_K)/alpha) / Z, whose last-state marginal is q*_alpha ∝ q_pre exp(r/alpha), and its
maximum is alpha log Z.

**Policy gradient** (:func:`policy_gradient`). Differentiating J, the path density contributes a
score function for every transition k (x_k -> x_{k+1}), multiplied by everything downstream of
it, and the KL terms contribute their direct dependence on theta:

    ∇J = E[ sum_k ∇ log p_theta(x_{k+1} | x_k) · (G_k - b_k) ] - alpha E[ sum_k ∇_theta KL_k(x_k; theta) ],
    G_k = r(x_K) - alpha sum_{j > k} KL_j(x_j).

Any baseline b_k that does not depend on chain b's own noise keeps it unbiased; we use the
leave-one-out mean of G_k over the other chains of the batch. DPOK drops the KL part of G_k
(``kl_score_function=False``: the gradient of an upper bound, with lower variance); DDPO's
score-function estimator has no KL at all (alpha -> 0). ``grad_steps`` = m < K differentiates a
uniformly drawn subset of m steps per iteration, scaled by K/m (DDPO also trains on a subset of
timesteps): unbiased, cheaper, noisier.

**Reward backpropagation** (:func:`reward_backprop`). The chain is a differentiable function of
theta and the noise (reparameterisation), so ∇J = E_z[ ∇_theta (r(x_K) - alpha sum_k KL_k(x_k)) ]
through the whole chain: a pathwise gradient, exact in expectation, for a differentiable reward.
``truncate`` = K' (DRaFT-K) stops the gradient through the states before the last K' steps
(those steps keep only their direct KL dependence): cheaper and biased.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from boltzlab.diffusion import GeometricNoiseSchedule, Projection, _identity, sample_prior
from boltzlab.finetune._checks import FinetuneInputError, Reward, _positive_float, _positive_int
from boltzlab.finetune.chain import (
    CountingReward,
    CountingScore,
    EvaluationCounter,
    chain_grid,
    check_rewards,
    path_kl_terms,
    sample_trajectories,
    step_kl,
    transition_log_prob,
)
from boltzlab.training import TrainingHistory, run_training

Evaluate = Callable[[nn.Module], Mapping[str, float]]


def _optional_positive_int(value: object, name: str) -> int | None:
    return None if value is None else _positive_int(value, name)


@dataclass(frozen=True)
class PolicyGradientConfig:
    """Settings of :func:`policy_gradient`: ``n_iterations`` Adam steps, each on ``batch_size``
    fresh chains of ``sde_steps`` steps; ``grad_steps`` steps per chain in the gradient (None:
    all); ``baseline``: leave-one-out baseline; ``kl_score_function``: keep the KL in the return
    (unbiased; False is DPOK's approximation); ``max_grad_norm``: gradient clipping (None: off)."""

    n_iterations: int = 200
    batch_size: int = 64
    sde_steps: int = 50
    alpha: float = 1.0
    lr: float = 1e-4
    grad_steps: int | None = None
    baseline: bool = True
    kl_score_function: bool = True
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_iterations", "batch_size", "sde_steps"):
            _positive_int(getattr(self, name), name)
        _positive_float(self.alpha, "alpha")
        _positive_float(self.lr, "lr")
        _optional_positive_int(self.grad_steps, "grad_steps")
        if self.grad_steps is not None and self.grad_steps > self.sde_steps:
            raise FinetuneInputError(f"grad_steps = {self.grad_steps} exceeds sde_steps = {self.sde_steps}")
        if self.baseline and self.batch_size < 2:
            raise FinetuneInputError("the leave-one-out baseline needs batch_size >= 2")
        if self.max_grad_norm is not None:
            _positive_float(self.max_grad_norm, "max_grad_norm")


@dataclass(frozen=True)
class RewardBackpropConfig:
    """Settings of :func:`reward_backprop`: as :class:`PolicyGradientConfig`, with ``truncate``
    = K' (backpropagate through the last K' steps only; None: all, the unbiased gradient)."""

    n_iterations: int = 200
    batch_size: int = 64
    sde_steps: int = 50
    alpha: float = 1.0
    lr: float = 1e-4
    truncate: int | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_iterations", "batch_size", "sde_steps"):
            _positive_int(getattr(self, name), name)
        _positive_float(self.alpha, "alpha")
        _positive_float(self.lr, "lr")
        _optional_positive_int(self.truncate, "truncate")
        if self.truncate is not None and self.truncate > self.sde_steps:
            raise FinetuneInputError(f"truncate = {self.truncate} exceeds sde_steps = {self.sde_steps}")
        if self.max_grad_norm is not None:
            _positive_float(self.max_grad_norm, "max_grad_norm")


@dataclass
class FinetuneRun:
    """A fine-tuned ``model`` (unwrapped), its ``history`` (per iteration: ``reward``, ``kl``
    (path KL to the pretrained sampler along the batch), ``objective`` = reward - alpha kl;
    ``history.evaluations`` from ``evaluate``, with the cumulative ``score_rows`` and
    ``reward_evals`` spent before each), and the ``counter`` of all evaluations spent."""

    model: nn.Module
    history: TrainingHistory
    counter: EvaluationCounter


def _setup(pretrained: nn.Module, reward: Reward, counter: EvaluationCounter | None
           ) -> tuple[CountingScore, CountingScore, CountingReward, EvaluationCounter]:
    counter = counter or EvaluationCounter()
    student = CountingScore(copy.deepcopy(pretrained), counter).train()
    student.requires_grad_(True)
    frozen = copy.deepcopy(pretrained).eval()
    frozen.requires_grad_(False)
    return student, CountingScore(frozen, counter), CountingReward(reward, counter), counter


def _evaluation(evaluate: Evaluate | None, student: CountingScore,
                counter: EvaluationCounter) -> Callable[[], dict[str, float]] | None:
    if evaluate is None:
        return None

    def run() -> dict[str, float]:
        spent = {"score_rows": float(counter.rows), "reward_evals": float(counter.rewards)}
        was_training = student.training
        student.eval()
        out = dict(evaluate(student.model))  # unwrapped: evaluation is not charged to fine-tuning
        student.train(was_training)
        return {**out, **spent}

    return run


def _step(optimizer: torch.optim.Optimizer, loss: Tensor, params: list[nn.Parameter], max_norm: float | None) -> None:
    optimizer.zero_grad()
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def policy_gradient_surrogate(
    student: nn.Module,
    pretrained_scores: Tensor,
    kl_terms: Tensor,
    trajectories_states: Tensor,
    times: Tensor,
    increments: Tensor,
    rewards: Tensor,
    alpha: float,
    *,
    steps: Tensor | None = None,
    baseline: bool = True,
    kl_score_function: bool = True,
    project: Projection | None = None,
) -> Tensor:
    r"""The scalar whose gradient is the policy-gradient estimate of -∇J (module docstring).

    ``trajectories_states`` (K + 1, B, dim), ``times`` (K + 1,), ``increments`` (K,),
    ``pretrained_scores`` (K, B, dim) = s_pre(x_k, t_k), ``kl_terms`` (K, B) = KL_k (detached),
    ``rewards`` (B,). ``steps`` (m,): the differentiated step indices (None: all K), scaled by K/m:

        L = -(1/B) sum_b (K/m) sum_{k in steps} [ A_bk log p_theta(x_{k+1} | x_k) - alpha KL_k(x_k; theta) ],
        A_bk = G_bk - mean_{b' != b} G_b'k,   G_bk = r_b - alpha sum_{j > k} KL_j,b.
    """
    k_steps, b, dim = pretrained_scores.shape
    project = project or _identity
    returns = rewards[None, :].expand(k_steps, b)
    if kl_score_function:
        downstream = kl_terms.flip(0).cumsum(0).flip(0) - kl_terms  # sum_{j > k} KL_j
        returns = returns - alpha * downstream
    advantage = returns - (returns.sum(1, keepdim=True) - returns) / (b - 1) if baseline else returns
    if steps is None:
        steps = torch.arange(k_steps)
    m = steps.shape[0]
    x_k = trajectories_states[steps].reshape(-1, dim)
    x_next = trajectories_states[steps + 1].reshape(-1, dim)
    t_k = times[steps].repeat_interleave(b)
    delta = increments[steps].repeat_interleave(b)
    s = student(x_k, t_k)
    log_p = transition_log_prob(s, x_k, x_next, delta, project)
    kl_direct = step_kl(s, pretrained_scores[steps].reshape(-1, dim), delta, project)
    per_row = advantage[steps].reshape(-1).detach() * log_p - alpha * kl_direct
    return -(k_steps / m) * per_row.sum() / b


def policy_gradient(
    pretrained: nn.Module,
    reward: Reward,
    schedule: GeometricNoiseSchedule,
    dim: int,
    config: PolicyGradientConfig,
    *,
    project: Projection | None = None,
    seed: int = 0,
    evaluate: Evaluate | None = None,
    eval_every: int = 0,
    counter: EvaluationCounter | None = None,
    progress: bool = True,
) -> FinetuneRun:
    r"""Fine-tune a copy of ``pretrained`` (score model ``(B, dim), (B,) -> (B, dim)``) by on-policy
    policy gradient with a KL penalty (module docstring). Each iteration samples ``batch_size``
    chains (no gradient), evaluates the reward on their last states and the pretrained score along
    them, and takes one Adam step on :func:`policy_gradient_surrogate`. Works with any reward,
    differentiable or not. ``evaluate(model)`` runs every ``eval_every`` iterations and at the end.
    """
    dim = _positive_int(dim, "dim")
    generator = torch.Generator().manual_seed(seed)
    student, frozen, counted_reward, counter = _setup(pretrained, reward, counter)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    k_steps = config.sde_steps

    def step(_: int) -> dict[str, float]:
        with torch.no_grad():
            traj = sample_trajectories(student, schedule, config.batch_size, dim, k_steps, project=project,
                                       generator=generator)
            r = check_rewards(counted_reward(traj.samples), config.batch_size)
            kl_terms, pre_scores = path_kl_terms(traj, frozen, project)
        if config.grad_steps is None:
            steps = torch.arange(k_steps)
        else:
            steps = torch.randperm(k_steps, generator=generator)[: config.grad_steps].sort().values
        loss = policy_gradient_surrogate(student, pre_scores, kl_terms, traj.states, traj.times, traj.increments, r,
                                         config.alpha, steps=steps, baseline=config.baseline,
                                         kl_score_function=config.kl_score_function, project=project)
        _step(optimizer, loss, params, config.max_grad_norm)
        kl = float(kl_terms.sum(0).mean())
        return {"reward": float(r.mean()), "kl": kl, "objective": float(r.mean()) - config.alpha * kl}

    history = run_training(step, config.n_iterations, progress=progress, desc="policy gradient",
                           evaluate=_evaluation(evaluate, student, counter),
                           eval_every=eval_every or config.n_iterations)
    return FinetuneRun(student.model.eval(), history, counter)


def reward_backprop_loss(
    student: nn.Module,
    pretrained: nn.Module,
    reward: Reward,
    schedule: GeometricNoiseSchedule,
    n: int,
    dim: int,
    n_steps: int,
    alpha: float,
    *,
    truncate: int | None = None,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""-(1/n) sum_b [ r(x_K) - alpha sum_k KL_k(x_k; theta) ] on n fresh chains, differentiable
    through the last ``truncate`` steps (None: all), and through the student's score at every step.

    Returns ``(loss, rewards (n,), path_kl (n,))``. The reward must be differentiable.
    """
    project = project or _identity
    times, deltas = chain_grid(schedule, n_steps)
    first_grad = 0 if truncate is None else n_steps - truncate
    x = sample_prior(schedule, n, dim, project=project, generator=generator)
    kl = torch.zeros(n)
    for k in range(n_steps):
        if k < first_grad:
            x = x.detach()
        t = times[k].expand(n)
        s = student(x, t)
        with torch.set_grad_enabled(k >= first_grad):
            s_pre = pretrained(x, t)  # differentiable in x only: the pretrained weights are frozen
        kl = kl + step_kl(s, s_pre, deltas[k], project)
        z = project(torch.randn(x.shape, generator=generator, dtype=x.dtype))
        x = project(x + deltas[k] * s + deltas[k].sqrt() * z)
    r = reward(x)
    if not r.requires_grad:
        raise FinetuneInputError("reward backpropagation needs a differentiable reward: reward(x) has no gradient "
                                 "(use policy_gradient or iterative_distillation for this reward)")
    return -(r - alpha * kl).mean(), r.detach(), kl.detach()


def reward_backprop(
    pretrained: nn.Module,
    reward: Reward,
    schedule: GeometricNoiseSchedule,
    dim: int,
    config: RewardBackpropConfig,
    *,
    project: Projection | None = None,
    seed: int = 0,
    evaluate: Evaluate | None = None,
    eval_every: int = 0,
    counter: EvaluationCounter | None = None,
    progress: bool = True,
) -> FinetuneRun:
    r"""Fine-tune a copy of ``pretrained`` by backpropagating the KL-regularised reward through the
    sampler (DRaFT; :func:`reward_backprop_loss`), one Adam step per batch of fresh chains."""
    dim = _positive_int(dim, "dim")
    if getattr(reward, "differentiable", True) is False:
        raise FinetuneInputError(f"{type(reward).__name__} is not differentiable: reward backpropagation cannot "
                                 "use it (use policy_gradient or iterative_distillation)")
    generator = torch.Generator().manual_seed(seed)
    student, frozen, counted_reward, counter = _setup(pretrained, reward, counter)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)

    def step(_: int) -> dict[str, float]:
        loss, r, kl = reward_backprop_loss(student, frozen, counted_reward, schedule, config.batch_size, dim,
                                           config.sde_steps, config.alpha, truncate=config.truncate, project=project,
                                           generator=generator)
        _step(optimizer, loss, params, config.max_grad_norm)
        return {"reward": float(r.mean()), "kl": float(kl.mean()),
                "objective": float(r.mean()) - config.alpha * float(kl.mean())}

    history = run_training(step, config.n_iterations, progress=progress, desc="reward backpropagation",
                           evaluate=_evaluation(evaluate, student, counter),
                           eval_every=eval_every or config.n_iterations)
    return FinetuneRun(student.model.eval(), history, counter)


def iteration_cost(config: PolicyGradientConfig | RewardBackpropConfig) -> dict[str, float]:
    """Score-network rows (forward passes) and reward evaluations one iteration spends, for budgeting."""
    b, k = config.batch_size, config.sde_steps
    if isinstance(config, PolicyGradientConfig):
        m = k if config.grad_steps is None else config.grad_steps
        return {"score_rows": float(b * (2 * k + m)), "reward_evals": float(b)}
    return {"score_rows": float(2 * b * k), "reward_evals": float(b)}

