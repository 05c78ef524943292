r"""Fine-tuning tasks on a particle system: the course's iDEM sampler of DW-4 (8-D) and two rewards.

The pretrained model q_pre is the first phase of the shipped iDEM sampler of DW-4,
``boltzlab/data/checkpoints/dw4_phase1`` (the course recipe after 100 outer iterations, energy W2
1.45: a score network s(x, t) of DW-4 at kT = 1 whose samples are a little hot; the fine-tuning
records of chapter 08 were made with it), *as sampled* by the chain of
:mod:`boltzlab.finetune.chain` with ``sde_steps`` steps and centre-of-mass projection: every
method is fine-tuned and measured with that same sampler, so path KLs are exact comparisons.

- ``"tempering"``: r = -(1/kT - 1/kT0) E with kT0 = 1 (the checkpoint's temperature) and a colder
  kT; at alpha = 1 the optimum q_pre exp(r)/Z is the Boltzmann density at kT to the extent that
  q_pre is the one at kT0 (:class:`~boltzlab.finetune.rewards.BoltzmannReward`).
- ``"inner_pairs"``: r = scale · (number of pairs inside the inner well of the pair potential),
  piecewise constant (:class:`~boltzlab.finetune.rewards.InnerPairReward`).

For each, the optimum's objective alpha log Z, reward and KL(q* || q_pre) are estimated by
importance sampling from many pretrained samples (:func:`~boltzlab.finetune.rewards.tilted_optimum`),
and, as a model-free reference, by reweighting the MCMC reference set of DW-4 at kT0 (the
optimum the task would have if q_pre were exact).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from boltzlab.diffusion import GeometricNoiseSchedule, Projection
from boltzlab.energies import Energy
from boltzlab.finetune._checks import FinetuneInputError, Reward, _positive_float, _positive_int
from boltzlab.finetune.chain import path_kl_terms, sample_trajectories
from boltzlab.finetune.rewards import BoltzmannReward, InnerPairReward, TiltedOptimum, tilted_optimum

TASK_NAMES = ("tempering", "inner_pairs")


@dataclass
class SamplerTask:
    """One fine-tuning problem: a frozen ``pretrained`` score model sampled with ``sde_steps`` steps
    of ``schedule`` (dimension ``dim``, ``project`` onto the COM-free subspace), a ``reward``, the
    KL weight ``alpha``, the importance-sampled ``optimum`` and a model-free ``reference`` optimum
    (dict of :class:`~boltzlab.finetune.rewards.TiltedOptimum` fields), and the ``pool`` of
    pretrained samples (n, dim) it was estimated from (reused by RWR and best-of-N)."""

    name: str
    pretrained: nn.Module
    schedule: GeometricNoiseSchedule
    dim: int
    project: Projection | None
    reward: Reward
    alpha: float
    sde_steps: int
    energy: Energy
    optimum: TiltedOptimum
    reference: dict[str, float]
    pool: Tensor
    pool_rewards: Tensor
    description: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def differentiable(self) -> bool:
        return bool(getattr(self.reward, "differentiable", True))

    def fresh_model(self) -> nn.Module:
        """A trainable copy of the pretrained model."""
        model = copy.deepcopy(self.pretrained)
        model.requires_grad_(True)
        return model


def _pretrained_pool(model: nn.Module, schedule: GeometricNoiseSchedule, dim: int, project: Projection | None,
                     n: int, sde_steps: int, generator: torch.Generator, chunk: int = 2000) -> Tensor:
    parts = [sample_trajectories(model, schedule, min(chunk, n - i), dim, sde_steps, project=project,
                                 generator=generator).samples for i in range(0, n, chunk)]
    return torch.cat(parts)


def dw4_tasks(
    *,
    kT: float = 0.75,
    pair_scale: float = 0.5,
    alpha: float = 1.0,
    sde_steps: int = 40,
    n_pool: int = 20_000,
    seed: int = 0,
    checkpoint: str | Path | None = None,
) -> dict[str, SamplerTask]:
    r"""The two DW-4 tasks (module docstring), sharing one pool of ``n_pool`` pretrained samples.

    ``kT``: the tempering target (kT0 = 1); ``pair_scale``: reward per inner pair. The pool costs
    n_pool · sde_steps score-network rows (about 30 s for 20 000 samples of 40 steps on one core).
    """
    from boltzlab.reference import load_reference
    from boltzlab.training.idem import SHIPPED_DIR, load_sampler

    _positive_float(kT, "kT")
    sde_steps, n_pool = _positive_int(sde_steps, "sde_steps"), _positive_int(n_pool, "n_pool")
    sampler = load_sampler(Path(checkpoint) if checkpoint is not None else SHIPPED_DIR / "dw4_phase1")
    model = sampler.model.eval()
    model.requires_grad_(False)
    energy = sampler.energy
    kT0 = float(energy.kT)
    if not kT < kT0:
        raise FinetuneInputError(f"the tempering target kT = {kT} must be colder than the checkpoint's kT0 = {kT0}")
    schedule, dim, project = sampler.config.schedule, energy.dim, energy.remove_com
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pool = _pretrained_pool(model, schedule, dim, project, n_pool, sde_steps, generator)
    mcmc = load_reference("dw4")
    rewards: dict[str, tuple[Reward, str]] = {
        "tempering": (BoltzmannReward(energy, kT=kT, kT0=kT0),
                      f"r = -(1/kT - 1/kT0) E, kT0 = {kT0:g} -> kT = {kT:g}; optimum p_kT if q_pre = p_kT0"),
        "inner_pairs": (InnerPairReward(energy, scale=pair_scale),
                        f"r = {pair_scale:g} x #pairs with d < {energy.dw_d0:g} (inner well); non-differentiable"),
    }
    tasks = {}
    for name, (reward, text) in rewards.items():
        r_pool = reward(pool).double()
        tasks[name] = SamplerTask(
            name=name, pretrained=model, schedule=schedule, dim=dim, project=project, reward=reward, alpha=alpha,
            sde_steps=sde_steps, energy=energy, optimum=tilted_optimum(r_pool, alpha),
            reference=tilted_optimum(reward(mcmc).double(), alpha).as_dict(), pool=pool, pool_rewards=r_pool,
            description=text, extra={"kT": kT, "kT0": kT0} if name == "tempering" else {"pair_scale": pair_scale},
        )
    return tasks


@torch.no_grad()
def evaluate_model(task: SamplerTask, model: nn.Module, n: int, generator: torch.Generator) -> dict[str, float]:
    r"""Reward and path KL of ``model``'s sampler against the pretrained one, on n fresh chains.

    Returns ``reward`` (mean r), ``kl`` (path KL(P_model || P_pre), an upper bound on the KL of the
    samples; exact for the chains), ``objective`` = reward - alpha kl, ``gap`` = alpha log Z - objective
    (>= 0 up to Monte Carlo error: alpha times the path KL to the optimum), their standard errors,
    and ``mean_energy``."""
    model.eval()
    traj = sample_trajectories(model, task.schedule, n, task.dim, task.sde_steps, project=task.project,
                               generator=generator)
    r = task.reward(traj.samples).double()
    kl = path_kl_terms(traj, task.pretrained, task.project)[0].sum(0).double()
    objective = r - task.alpha * kl
    se = lambda v: float(v.std() / math.sqrt(n))  # noqa: E731
    return {"reward": float(r.mean()), "reward_se": se(r), "kl": float(kl.mean()), "kl_se": se(kl),
            "objective": float(objective.mean()), "objective_se": se(objective),
            "gap": task.optimum.objective - float(objective.mean()),
            "mean_energy": float(task.energy.energy(traj.samples).mean())}
