r"""The discretised reverse SDE as a Markov chain (a "policy"), with exact transition densities.

On the time grid t_k = 1 - k/K (k = 0..K) a sampler with score s takes the steps

    x_{k+1} = P( x_k + Δ_k s(x_k, t_k) + sqrt(Δ_k) z_k ),   Δ_k = sigma_{t_k}^2 - sigma_{t_{k+1}}^2,

from x_0 ~ N(0, sigma_1^2 I) projected (P: the centre-of-mass projection for particles, else the
identity; the noise z_k is projected too). This is :func:`boltzlab.diffusion.reverse_sde_sample`
with ``increment="exact"``. Every transition is Gaussian on the subspace,

    log p_s(x_{k+1} | x_k) = -| x_{k+1} - P(x_k + Δ_k s(x_k, t_k)) |^2 / (2 Δ_k) + const,

and two samplers with scores s, s' share the noise, so the KL between their path measures is a
sum of per-step Gaussian KLs (Girsanov's theorem, discretised; DPOK, Fan et al. 2023, eq. 6):

    KL(P_s || P_s') = E_{P_s}[ sum_k (Δ_k / 2) | P(s(x_k, t_k) - s'(x_k, t_k)) |^2 ].

By the data-processing inequality it bounds the KL between the two samplers' final samples from
above; for the KL-regularised optimum P* ∝ P_pre exp(r(x_K)/alpha) the two are equal (tilting the
last state leaves the path's conditional law given it unchanged), so
alpha log E_pre[exp(r/alpha)] is also the best value of E[r] - alpha KL on paths.
(Here the chain index k counts *sampler steps*; the final sample is x_K, at time 0.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from boltzlab.diffusion import GeometricNoiseSchedule, Projection, ScoreFn, _identity, sample_prior
from boltzlab.finetune._checks import FinetuneInputError, Reward, _positive_int, _tensor


def chain_grid(schedule: GeometricNoiseSchedule, n_steps: int,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Times t_k = 1 - k/K, shape (K + 1,), and variance increments Δ_k, shape (K,) (computed in float64)."""
    n_steps = _positive_int(n_steps, "n_steps")
    times = torch.linspace(1.0, 0.0, n_steps + 1, dtype=torch.float64)
    var = schedule.variance(times)
    return times.to(dtype), (var[:-1] - var[1:]).to(dtype)


@dataclass
class Trajectories:
    """Sampled chains: ``states`` (K + 1, B, dim) from x_0 (prior) to x_K (the samples),
    ``scores`` (K, B, dim) the sampler's s(x_k, t_k) at each step, ``times`` (K + 1,),
    ``increments`` Δ_k (K,)."""

    states: Tensor
    scores: Tensor
    times: Tensor
    increments: Tensor

    @property
    def samples(self) -> Tensor:
        """x_K, (B, dim)."""
        return self.states[-1]


@torch.no_grad()
def sample_trajectories(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    n: int,
    dim: int,
    n_steps: int,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Trajectories:
    """n chains of the sampler with score ``score`` (module docstring), without gradients."""
    n, dim = _positive_int(n, "n"), _positive_int(dim, "dim")
    project = project or _identity
    times, deltas = chain_grid(schedule, n_steps, dtype)
    x = sample_prior(schedule, n, dim, project=project, generator=generator, dtype=dtype)
    states, scores = [x], []
    for k in range(n_steps):
        s = score(x, times[k].expand(n))
        z = project(torch.randn(x.shape, generator=generator, dtype=dtype))
        x = project(x + deltas[k] * s + deltas[k].sqrt() * z)
        states.append(x)
        scores.append(s)
    return Trajectories(torch.stack(states), torch.stack(scores), times, deltas)


def transition_log_prob(score_k: Tensor, x_k: Tensor, x_next: Tensor, delta: Tensor,
                        project: Projection | None = None) -> Tensor:
    r"""log p(x_{k+1} | x_k) up to a constant that does not depend on the score:
    -| x_{k+1} - P(x_k + Δ s) |^2 / (2 Δ).

    ``score_k``, ``x_k``, ``x_next`` (N, dim); ``delta`` (N,) or a scalar. Returns (N,).
    Differentiable in ``score_k`` (the policy gradient's score function)."""
    project = project or _identity
    delta = torch.as_tensor(delta, dtype=x_k.dtype)
    if delta.ndim == 1:
        delta = delta[:, None]
    residual = x_next - project(x_k + delta * score_k)
    return -residual.pow(2).sum(-1) / (2.0 * delta.reshape(-1))


def step_kl(score_a: Tensor, score_b: Tensor, delta: Tensor, project: Projection | None = None) -> Tensor:
    r"""KL between the Gaussian transitions of two samplers from the same state,
    (Δ/2) | P(s_a - s_b) |^2: ``(N, dim), (N, dim), (N,) or scalar -> (N,)``."""
    project = project or _identity
    delta = torch.as_tensor(delta, dtype=score_a.dtype)
    return 0.5 * delta.reshape(-1) * project(score_a - score_b).pow(2).sum(-1)


@torch.no_grad()
def path_kl_terms(trajectories: Trajectories, reference: ScoreFn, project: Projection | None = None,
                  chunk: int = 8192) -> tuple[Tensor, Tensor]:
    r"""Per-step KL_k = (Δ_k/2) |P(s(x_k) - s_ref(x_k))|^2 along sampled chains, shape (K, B),
    and the reference scores s_ref(x_k, t_k), shape (K, B, dim).

    Summed over k and averaged over chains KL_k estimates KL(P_s || P_ref) (module docstring).
    The reference score is evaluated on all K B states in chunks of ``chunk`` rows."""
    k_steps, b, dim = trajectories.scores.shape
    x = trajectories.states[:-1].reshape(-1, dim)
    t = trajectories.times[:-1].repeat_interleave(b)
    ref = torch.cat([reference(x[i:i + chunk], t[i:i + chunk]) for i in range(0, x.shape[0], chunk)])
    delta = trajectories.increments.repeat_interleave(b)
    kl = step_kl(trajectories.scores.reshape(-1, dim), ref, delta, project).reshape(k_steps, b)
    return kl, ref.reshape(k_steps, b, dim)


class EvaluationCounter:
    """A shared tally: ``rows`` passed through score networks, ``rewards`` evaluated.

    Deep copies return the same object, so every copy of a wrapped model (students, teachers,
    snapshots) counts into one tally."""

    def __init__(self) -> None:
        self.rows = 0
        self.rewards = 0

    def __deepcopy__(self, memo: dict) -> "EvaluationCounter":
        return self


class CountingScore(nn.Module):
    """``model`` with every forward pass counted in ``counter.rows`` (B rows per call).

    Backward passes are not counted; the state dict is the wrapped model's, under ``model.``."""

    def __init__(self, model: nn.Module, counter: EvaluationCounter) -> None:
        super().__init__()
        self.model = model
        self.counter = counter

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.counter.rows += int(x.shape[0])
        return self.model(x, t)


class CountingReward:
    """``reward`` with every evaluated state counted in ``counter.rewards``; keeps ``differentiable``."""

    def __init__(self, reward: Reward, counter: EvaluationCounter) -> None:
        self.reward = reward
        self.counter = counter
        self.differentiable = bool(getattr(reward, "differentiable", True))

    def __call__(self, x: Tensor) -> Tensor:
        self.counter.rewards += int(x.shape[0])
        return self.reward(x)


def check_rewards(r: object, n: int) -> Tensor:
    """A reward's output must be finite with shape (n,)."""
    r = _tensor(r, 1, "reward(x)", "(B,)")
    if r.shape[0] != n:
        raise FinetuneInputError(f"reward(x) returned {r.shape[0]} values for {n} states")
    return r
