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

1. *roll-in*: run a reverse SDE from t = 1 and stop at a random time t: states x_t
   (:func:`rollin`). From the current student it is on-policy; from the pretrained model, or a
   mixture of the two, it is off-policy (:func:`rollin_states`);
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
   whichever model produced the states: that is why the roll-in may be off-policy
   (the target is a function of the state, made by the teacher's roll-outs and their weights);
5. *teacher refresh*: at the end of the round the teacher becomes a copy of the student.

Refreshing changes the fixed point: round k distils tau_k · exp(r/alpha_k) and the next
round starts from it, so after K rounds the student targets q0 · exp(r sum_k 1/alpha_k).
Keeping alpha_k = 1 would compound to exp(K r) (too cold). :func:`tempering_alphas` picks
alpha_k with sum_k 1/alpha_k = 1/alpha_total, e.g. alpha_k = K for an exact overall tilt
exp(r): a tempering curriculum kT0 -> ... -> kT (:func:`composed_alpha` checks it).

**Baselines** (the methods VIDD is compared with).

- :func:`best_of_n` keeps the best of N pretrained samples; its density is N q0(x) F(r(x))^{N-1}
  with F the CDF of r under q0 (:func:`best_of_n_grid_probs`, on a grid or over a discrete
  reward's values) and KL(best-of-N || q0) = log N - (N - 1)/N (:func:`best_of_n_kl`): a sharpened
  q0, not q0 · exp(r).
- Reward-weighted regression fits the model by denoising score matching on pretrained samples
  resampled with self-normalised weights exp(r/alpha) (:func:`fit_score_model` with ``weights``;
  :func:`reward_weights`).
- On-policy policy gradient with a KL penalty (DDPO, Black et al. 2023; DPOK, Fan et al. 2023;
  :func:`policy_gradient`) and reward backpropagation through the sampler, optionally truncated
  to its last steps (DRaFT, Clark et al. 2023; :func:`reward_backprop`) both treat the
  discretised reverse SDE as a Markov chain with Gaussian transitions (:mod:`.chain`) and maximise
  E[r(x_K)] - alpha KL(P_theta || P_pre) over paths, whose optimum has the last-state marginal
  q0 · exp(r/alpha) / Z and the value alpha log Z (:mod:`.policy`).

**Checking them.** :mod:`.gaussian` gives the chain of a Gaussian score model in closed form, so
the exact objective, its exact gradient and its exact optimum are known (:func:`gaussian_chain_objective`,
:func:`gaussian_chain_optimum`). :func:`tilted_optimum` estimates the optimum's alpha log Z, reward and
KL(q* || q0) by importance sampling from pretrained samples (:func:`discrete_tilted_optimum`: exactly,
for a reward with finitely many values). :mod:`.tasks` sets up DW-4 with the course's iDEM
checkpoint, a tempering reward and a piecewise-constant structural reward
(:class:`InnerPairReward`); :mod:`.compare` runs every method on them
(``python -m boltzlab.finetune.compare`` or ``benchmarks/finetune_compare.py``).

Also here: :class:`PreconditionedScore` (a score network with O(1) inputs and outputs at every
noise level), :func:`fit_score_model` (denoising score matching, optionally weighted: pretraining
and RWR; it lives in :mod:`boltzlab.diffusion` and is re-exported here), :func:`grid_kl` (KL
between densities on a quadrature grid). Score functions follow :mod:`boltzlab.diffusion`:
``score(x (B, dim), t (B,)) -> (B, dim)``. Bad input raises :class:`FinetuneInputError` (a
``ValueError``) naming the problem (:class:`~boltzlab.diffusion.DiffusionInputError`, also a
``ValueError``, from :func:`fit_score_model`).

**Where things live.** :mod:`.vidd` (iterative distillation and its roll-ins), :mod:`.baselines`
(RWR's weights, best-of-N), :mod:`.chain` and :mod:`.policy` (the sampler as a policy:
policy gradient, reward backpropagation), :mod:`.rewards` (rewards and their optima),
:mod:`.gaussian` (closed forms), :mod:`.tasks` and :mod:`.compare` (DW-4), :mod:`.models`
(:class:`PreconditionedScore`), :mod:`.measures` (:func:`grid_kl`). Every public name is
importable from ``boltzlab.finetune`` itself (:mod:`.tasks` and :mod:`.compare` load the
checkpoint and the reference data, so they are imported on demand).
"""

from boltzlab.diffusion import fit_score_model
from boltzlab.finetune._checks import FinetuneInputError, Reward
from boltzlab.finetune.baselines import (
    best_of_n,
    best_of_n_grid_probs,
    best_of_n_kl,
    reward_weights,
)
from boltzlab.finetune.chain import (
    CountingReward,
    CountingScore,
    EvaluationCounter,
    Trajectories,
    chain_grid,
    path_kl_terms,
    sample_trajectories,
    step_kl,
    transition_log_prob,
)
from boltzlab.finetune.gaussian import (
    GaussianScore,
    gaussian_chain_moments,
    gaussian_chain_objective,
    gaussian_chain_optimum,
)
from boltzlab.finetune.measures import grid_kl
from boltzlab.finetune.models import PreconditionedScore
from boltzlab.finetune.policy import (
    FinetuneRun,
    PolicyGradientConfig,
    RewardBackpropConfig,
    iteration_cost,
    policy_gradient,
    policy_gradient_surrogate,
    reward_backprop,
    reward_backprop_loss,
)
from boltzlab.finetune.rewards import (
    BoltzmannReward,
    InnerPairReward,
    TiltedOptimum,
    discrete_tilted_optimum,
    tilted_optimum,
)
from boltzlab.finetune.vidd import (
    ROLLIN_MODELS,
    DistillationConfig,
    DistillationResult,
    composed_alpha,
    iterative_distillation,
    rollin,
    rollin_states,
    rollout,
    score_regression_loss,
    soft_optimal_weights,
    tempering_alphas,
    tilted_score_target,
)

__all__ = [
    "ROLLIN_MODELS",
    "BoltzmannReward",
    "CountingReward",
    "CountingScore",
    "DistillationConfig",
    "DistillationResult",
    "EvaluationCounter",
    "FinetuneInputError",
    "FinetuneRun",
    "GaussianScore",
    "InnerPairReward",
    "PolicyGradientConfig",
    "PreconditionedScore",
    "Reward",
    "RewardBackpropConfig",
    "TiltedOptimum",
    "Trajectories",
    "best_of_n",
    "best_of_n_grid_probs",
    "best_of_n_kl",
    "chain_grid",
    "composed_alpha",
    "discrete_tilted_optimum",
    "fit_score_model",
    "gaussian_chain_moments",
    "gaussian_chain_objective",
    "gaussian_chain_optimum",
    "grid_kl",
    "iteration_cost",
    "iterative_distillation",
    "path_kl_terms",
    "policy_gradient",
    "policy_gradient_surrogate",
    "reward_backprop",
    "reward_backprop_loss",
    "reward_weights",
    "rollin",
    "rollin_states",
    "rollout",
    "sample_trajectories",
    "score_regression_loss",
    "soft_optimal_weights",
    "step_kl",
    "tempering_alphas",
    "tilted_optimum",
    "tilted_score_target",
    "transition_log_prob",
]
