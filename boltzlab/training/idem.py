r"""iDEM and pDEM: training a diffusion sampler from the energy alone (chapter 05).

iDEM (Akhound-Sadegh et al. 2024) alternates two loops.

- inner (simulation-free regression): draw x_0 from a replay buffer, noise it,
  x_t = x_0 + sigma_t eps, and regress the score network onto the clipped Monte Carlo
  estimate of the noised score (:func:`boltzlab.estimators.mc_score`)

      S_K(x_t, t) = sum_k softmax_k(-E(x_t + sigma_t u_k)/kT) F(x_t + sigma_t u_k)/kT

  or, by default, its blend with the noise form sum_k w_k u_k / sigma_t
  (:func:`boltzlab.estimators.blended_score`), which is far quieter at large sigma_t:
  for DW-4 at sigma = 1 the mean squared error of K = 500 targets drops from 176 to 2.4
  (chapter 05 measures it);
      L(theta) = E_t,x_t [ lambda(t) || s_theta(x_t, t) - clip(S_K(x_t, t)) ||^2 ],
      lambda(t) = sigma_t^2 + local_scale^2   (with :class:`~boltzlab.diffusion.ScaledScore`,
      an order-one loss at every noise level);

- outer: run the reverse SDE of the current model (its exponential moving average) and
  add the samples to the buffer, so training points follow the model towards the target.

pDEM learns the noised energy instead: a scalar network E_theta(x, t) is regressed onto the
Monte Carlo estimate of E_t(x) = -kT log E_u[exp(-E(x + sigma_t u)/kT)],

      Ê_K(x_t, t) = -kT [ logsumexp_k(-E(x_t + sigma_t u_k)/kT) - log K ],

and sampling uses its score -∇E_theta / kT. (The log of an average is biased for finite K,
like the score estimator; chapter 04 measures that bias.)

Everything that makes a run reproducible and honest is here: a dataclass config per
target (:data:`CONFIGS`), one ``torch.Generator`` for all randomness, resumable
checkpoints (stop and continue equals an uninterrupted run with the same seed), and
``energy_evaluations``, the number of target-energy evaluations spent on training, which
chapter 05 gives to MCMC as its budget. Under ``torchrun`` the inner loop runs
data-parallel with :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs,
gloo on CPUs); each rank draws its own batches and fills its own buffer.

Command line: ``python -m boltzlab train TARGET --out DIR [--resume | --auto-resume]
[--stop-after N] [--set FIELD=VALUE ...] [--baseline]``; ``--baseline`` then runs the equal-budget MCMC
comparison (:func:`equal_budget_mcmc`) and saves it beside the checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab import metrics
from boltzlab.diffusion import (
    GeometricNoiseSchedule,
    ReplayBuffer,
    ScaledEnergy,
    ScaledScore,
    perturb,
    reverse_sde_sample,
    sample_prior,
    sample_times,
)
from boltzlab.energies import Energy, GaussianMixture, PairPotential, get_target
from boltzlab.estimators import mc_score

METHODS = ("idem", "pdem")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
NETWORKS = ("mlp", "egnn")
CHECKPOINT = "checkpoint.pt"


class TrainingConfigError(ValueError):
    """An unknown target, method or network, or a size that is not positive."""


class CheckpointError(FileNotFoundError):
    """A checkpoint that is missing, or that belongs to a different configuration."""


@dataclass(frozen=True)
class IDEMConfig:
    """Everything one iDEM/pDEM run depends on (saved beside every checkpoint)."""

    target: str
    method: str = "idem"
    network: str = "mlp"
    hidden: int = 128
    n_layers: int = 3
    data_scale: float = 1.0  # typical coordinate size, for the network's input scaling
    local_scale: float = 0.1  # width of the target's wells: sets the score's size (ScaledScore)
    sigma_min: float = 0.01
    sigma_max: float = 1.0
    n_mc: int = 500  # K: Monte Carlo copies per score target
    estimator: str = "blended"  # "lse" (chapter 04's force form) or "blended" (force + noise form)
    max_norm: float | None = None  # clip targets (per particle for particle systems)
    batch_size: int = 256
    lr: float = 5e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    n_outer: int = 100  # outer iterations (buffer refills)
    inner_steps: int = 100  # regression steps per outer iteration
    n_refill: int = 512  # reverse-SDE samples added to the buffer per outer iteration
    sde_steps: int = 200  # Euler-Maruyama steps per reverse-SDE run
    buffer_capacity: int = 10_000
    t_min: float = 1e-3  # regression times t ~ U(t_min, 1)
    eval_every: int = 10  # outer iterations between evaluations (and at the end)
    n_eval: int = 1_000  # samples per evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        from boltzlab.energies import TARGETS

        if self.target not in TARGETS:
            raise TrainingConfigError(f"unknown target {self.target!r}; known: {', '.join(TARGETS)}")
        if self.method not in METHODS:
            raise TrainingConfigError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.network not in NETWORKS:
            raise TrainingConfigError(f"unknown network {self.network!r}; use one of {', '.join(NETWORKS)}")
        for name in ("hidden", "n_layers", "n_mc", "batch_size", "n_outer", "inner_steps", "n_refill",
                     "sde_steps", "buffer_capacity", "eval_every", "n_eval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingConfigError(f"{name} must be a positive int, got {value!r}")
        if self.estimator not in ("lse", "blended"):
            raise TrainingConfigError(f"unknown estimator {self.estimator!r}; use 'lse' or 'blended'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainingConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        GeometricNoiseSchedule(self.sigma_min, self.sigma_max)  # validates the schedule

    @property
    def schedule(self) -> GeometricNoiseSchedule:
        return GeometricNoiseSchedule(self.sigma_min, self.sigma_max)

    def energy_evaluations_per_step(self) -> int:
        """Target energies (each with its forces) evaluated per regression step, per rank."""
        return self.batch_size * self.n_mc


# Sizes for a 2-core CPU; sigma_max follows the scale of each target (about the spread of
# its samples, so the prior N(0, sigma_1^2) covers every mode).
# n_outer is the planned length of each run; the shipped checkpoints record how far they got
# (``metrics.json``: outer_iterations) and continue with ``--resume``.
CONFIGS: dict[str, IDEMConfig] = {
    "gmm40": IDEMConfig("gmm40", network="mlp", hidden=128, n_layers=3, data_scale=23.0, local_scale=1.3,
                        sigma_max=70.0, n_mc=256, max_norm=70.0, batch_size=256, lr=1e-3, n_outer=80,
                        inner_steps=100, n_refill=1_000, sde_steps=200, buffer_capacity=5_000, eval_every=10,
                        n_eval=1_000),
    "dw4": IDEMConfig("dw4", network="egnn", hidden=64, n_layers=3, data_scale=1.9, local_scale=0.2, sigma_max=3.0,
                      n_mc=256, max_norm=40.0, batch_size=128, lr=1e-3, n_outer=100, inner_steps=100, n_refill=500,
                      sde_steps=200, buffer_capacity=5_000, eval_every=10, n_eval=1_000),
    "lj13": IDEMConfig("lj13", network="egnn", hidden=32, n_layers=3, data_scale=0.7, local_scale=0.07,
                       sigma_max=2.0, n_mc=128, max_norm=150.0, batch_size=64, lr=5e-4, n_outer=100, inner_steps=50,
                       n_refill=200, sde_steps=100, buffer_capacity=4_000, eval_every=20, n_eval=500),
    "lj55": IDEMConfig("lj55", network="egnn", hidden=32, n_layers=3, data_scale=1.0, local_scale=0.05,
                       sigma_max=1.0, n_mc=64, max_norm=200.0, batch_size=16, lr=5e-4, n_outer=15, inner_steps=30,
                       n_refill=64, sde_steps=100, buffer_capacity=2_000, eval_every=15, n_eval=200),
}


def config_for(target: str, **overrides: Any) -> IDEMConfig:
    """The shipped config of ``target`` with ``overrides`` applied (e.g. ``n_outer=5``)."""
    if target not in CONFIGS:
        raise TrainingConfigError(f"no iDEM config for {target!r}; known: {', '.join(CONFIGS)}")
    unknown = set(overrides) - set(IDEMConfig.__dataclass_fields__)
    if unknown:
        raise TrainingConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
    return replace(CONFIGS[target], **overrides)


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------


def _projection(energy: Energy):
    if isinstance(energy, PairPotential):
        return energy.remove_com
    return None


def build_model(config: IDEMConfig, energy: Energy) -> nn.Module:
    """The score network of ``config``: ``model(x (B, dim), t (B,)) -> (B, dim)``.

    pDEM wraps a scalar-energy network in :class:`~boltzlab.models.EnergyScore`, so the
    model also has ``model.energy(x, t) -> (B,)``.
    """
    from boltzlab import models

    project = _projection(energy)
    if config.method == "pdem":
        if config.network != "mlp":
            raise TrainingConfigError("pDEM is implemented with the MLP energy network only; use network='mlp'")
        energy_net = ScaledEnergy(models.EnergyMLP(energy.dim, config.hidden, config.n_layers), config.schedule,
                                  config.data_scale)
        return models.EnergyScore(energy_net, kT=energy.kT)
    net: nn.Module
    if config.network == "egnn":
        if not isinstance(energy, PairPotential):
            raise TrainingConfigError(f"the EGNN needs a particle system; {config.target!r} is not one")
        net = models.EGNN(energy.n_particles, energy.spatial_dim, hidden=config.hidden, n_layers=config.n_layers)
    else:
        net = models.ScoreMLP(energy.dim, hidden=config.hidden, n_layers=config.n_layers, project=project)
    return ScaledScore(net, config.schedule, config.data_scale, config.local_scale)


# ----------------------------------------------------------------------------------------
# the two loops
# ----------------------------------------------------------------------------------------


def noised_energy_estimate(energy: Energy, x_t: Tensor, sigma: Tensor, n_mc: int,
                           generator: torch.Generator | None = None) -> Tensor:
    """Ê_K(x_t) = -kT [logsumexp_k(-E(x_t + sigma u_k)/kT) - log K]: (B, dim), (B,) -> (B,)."""
    u = torch.randn(x_t.shape[0], n_mc, x_t.shape[1], generator=generator, dtype=x_t.dtype, device=x_t.device)
    project = _projection(energy)
    if project is not None:
        u = project(u)
    e = energy.energy(x_t[:, None, :] + sigma[:, None, None] * u)
    return -energy.kT * (torch.logsumexp(-e / energy.kT, dim=1) - math.log(n_mc))


def regression_loss(model: nn.Module, config: IDEMConfig, energy: Energy, x0: Tensor,
                    generator: torch.Generator) -> Tensor:
    """One inner-loop loss on buffer states ``x0`` (B, dim): the weighted regression above."""
    schedule = config.schedule
    t = sample_times(x0.shape[0], generator=generator, t_min=config.t_min, dtype=x0.dtype)
    x_t, _ = perturb(x0, t, schedule, project=_projection(energy), generator=generator)
    sigma = schedule.std(t)
    weight = schedule.variance(t) + config.local_scale**2  # ScaledScore.weight: an order-one loss
    if config.method == "pdem":
        target_e = noised_energy_estimate(energy, x_t, sigma, config.n_mc, generator)
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        # energies in kT units, equally weighted over t (their scale does not blow up at small t)
        return ((inner.energy(x_t, t) - target_e).pow(2) / energy.kT**2).mean()
    with torch.no_grad():
        extra = {"local_scale": config.local_scale} if config.estimator == "blended" else {}
        target = mc_score(energy, x_t, sigma, config.n_mc, generator=generator, max_norm=config.max_norm,
                          estimator=config.estimator, **extra)  # type: ignore[arg-type]
    return (weight * (model(x_t, t) - target).pow(2).sum(-1)).mean()


def sample_model(model: nn.Module, config: IDEMConfig, energy: Energy, n: int,
                 generator: torch.Generator | None = None, sde_steps: int | None = None,
                 progress: bool = False) -> Tensor:
    """n samples from the reverse SDE of ``model``: (n, dim). Costs no energy evaluations."""
    project = _projection(energy)
    x1 = sample_prior(config.schedule, n, energy.dim, project=project, generator=generator)
    was_training = model.training
    model.eval()
    if config.method == "pdem":
        # the score of an energy network needs autograd even while sampling
        def score(x: Tensor, t: Tensor) -> Tensor:
            with torch.enable_grad():
                return model(x, t).detach()
    else:
        score = model
    x = reverse_sde_sample(score, config.schedule, x1, sde_steps or config.sde_steps, project=project,
                           generator=generator, progress=progress)
    model.train(was_training)
    return x


def evaluation_reference(target: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Ground-truth samples for evaluation: exact for GMM-40, the shipped MCMC sets otherwise."""
    energy = get_target(target)
    if isinstance(energy, GaussianMixture):
        return energy.sample(n, generator=generator)
    from boltzlab.reference import load_reference

    return load_reference(target, n=n, generator=generator)


def evaluate_samples(energy: Energy, x: Tensor, reference: Tensor,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """The course's metrics of samples ``x`` (N, dim) against ``reference`` (M, dim).

    energy W2 (W2, not W2^2), x-W2 (exact OT, subsets of 1000; saturates in high dimension),
    and for particle systems the interatomic-distance W2 and TVD, for GMM-40 the modes covered.
    Samples with non-finite energies are dropped before the energy metrics and counted.
    """
    e_x, e_ref = energy.energy(x), energy.energy(reference)
    finite = torch.isfinite(e_x)
    out = {
        "energy_w2": metrics.energy_w2(e_x[finite], e_ref),
        "x_w2": metrics.x_w2(x, reference, max_samples=1000, generator=generator),
        "mean_energy": float(e_x[finite].mean()),
        "nonfinite_fraction": float(1.0 - finite.float().mean()),
    }
    if isinstance(energy, PairPotential):
        n, d = energy.n_particles, energy.spatial_dim
        out["distance_w2"] = metrics.distance_w2(x, reference, n, d)
        out["distance_tvd"] = metrics.distance_tvd(x, reference, n, d)
    if isinstance(energy, GaussianMixture):
        covered, _ = metrics.mode_coverage(x, energy.means, energy.std)
        out["modes_covered"] = float(covered)
    return out


# ----------------------------------------------------------------------------------------
# state, checkpoints and the run
# ----------------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """Everything a resumed run needs, besides the config."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    buffer: ReplayBuffer
    generator: torch.Generator
    outer: int = 0  # outer iterations completed
    energy_evaluations: int = 0  # summed over ranks
    wall_time: float = 0.0  # seconds spent training, summed over sessions
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per outer iteration
    evaluations: list[dict[str, float]] = field(default_factory=list)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def initial_state(config: IDEMConfig, energy: Energy) -> TrainingState:
    """A fresh model (initialised from ``config.seed``), its EMA, Adam, and an empty buffer."""
    rank, _ = _world()
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_model(config, energy)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)
    return TrainingState(model, ema, optimizer, ReplayBuffer(config.buffer_capacity, energy.dim), generator)


def save_checkpoint(state: TrainingState, config: IDEMConfig, out_dir: Path) -> Path:
    """Write ``checkpoint.pt`` (atomically), ``config.json`` and ``metrics.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": asdict(config),
        "model": state.model.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "buffer": state.buffer.state_dict(),
        "generator": state.generator.get_state(),
        "outer": state.outer,
        "energy_evaluations": state.energy_evaluations,
        "wall_time": state.wall_time,
        "history": state.history,
        "evaluations": state.evaluations,
    }
    tmp = out_dir / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out_dir / CHECKPOINT)
    (out_dir / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    summary = {
        "target": config.target,
        "method": config.method,
        "outer_iterations": state.outer,
        "energy_evaluations": state.energy_evaluations,
        "training_wall_time_s": round(state.wall_time, 1),
        "final": state.evaluations[-1] if state.evaluations else None,
        "evaluations": state.evaluations,
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return out_dir / CHECKPOINT


def shipped_checkpoint(target: str) -> Path:
    """The directory of the checkpoint shipped for ``target`` (``boltzlab/data/checkpoints/TARGET``),
    with ``checkpoint.pt``, ``config.json``, ``metrics.json``, ``samples.pt`` (the final
    evaluation's samples) and ``mcmc_baseline.json``."""
    path = SHIPPED_DIR / target
    if not (path / CHECKPOINT).is_file():
        shipped = sorted(p.name for p in SHIPPED_DIR.glob("*") if (p / CHECKPOINT).is_file())
        raise CheckpointError(f"no shipped checkpoint for {target!r} in {SHIPPED_DIR} (shipped: "
                              f"{', '.join(shipped) or 'none'}); train it with "
                              f"`python -m boltzlab train {target} --out {path} --baseline`")
    return path


def _load_payload(path: Path) -> dict[str, Any]:
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; train one with `python -m boltzlab train TARGET --out {path.parent}`"
        )
    return torch.load(path, map_location="cpu", weights_only=False)


def load_state(path: Path, config: IDEMConfig, energy: Energy) -> TrainingState:
    """Restore a :class:`TrainingState` saved by :func:`save_checkpoint` under the same config
    (only ``n_outer`` may differ, so a finished run can be continued for longer)."""
    payload = _load_payload(path)
    saved = IDEMConfig(**payload["config"])
    if replace(saved, n_outer=config.n_outer) != config:
        diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items()
                if k != "n_outer" and getattr(config, k) != v}
        raise CheckpointError(f"checkpoint at {path} was trained with a different config: {diff}")
    state = initial_state(config, energy)
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.buffer.load_state_dict(payload["buffer"])
    state.generator.set_state(payload["generator"])
    state.outer = payload["outer"]
    state.energy_evaluations = payload["energy_evaluations"]
    state.wall_time = payload["wall_time"]
    state.history = payload["history"]
    state.evaluations = payload["evaluations"]
    return state


@dataclass(frozen=True)
class TrainedSampler:
    """A trained model (its EMA weights) with the config and bookkeeping it was trained under."""

    model: nn.Module
    config: IDEMConfig
    energy: Energy
    energy_evaluations: int
    wall_time: float
    evaluations: list[dict[str, float]]

    def sample(self, n: int, generator: torch.Generator | None = None, sde_steps: int | None = None,
               progress: bool = False) -> Tensor:
        """n samples from the reverse SDE, (n, dim)."""
        return sample_model(self.model, self.config, self.energy, n, generator, sde_steps, progress)


def load_sampler(path: str | Path) -> TrainedSampler:
    """Load a checkpoint directory (or file) written by :func:`train_idem`, for sampling."""
    return _sampler_from_payload(_load_payload(Path(path)))


def _sampler_from_payload(payload: dict[str, Any]) -> TrainedSampler:
    config = IDEMConfig(**payload["config"])
    energy = get_target(config.target)
    model = build_model(config, energy)
    model.load_state_dict(payload["ema"])
    model.eval()
    return TrainedSampler(model, config, energy, payload["energy_evaluations"], payload["wall_time"],
                          payload["evaluations"])


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)


def _all_sum(value: int) -> int:
    _, world = _world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return int(t.item())


def check_ranks_in_sync(model: nn.Module) -> None:
    """Under DistributedDataParallel every rank must hold the same weights after each step;
    compare a checksum of the parameters across ranks and fail loudly if they drifted."""
    _, world = _world()
    if world == 1:
        return
    flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    mine = torch.stack([flat.sum(), flat.pow(2).sum()])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if any(not torch.allclose(g, gathered[0], rtol=1e-10, atol=0.0) for g in gathered):
        raise RuntimeError(f"DDP ranks hold different weights: checksums {[g.tolist() for g in gathered]}")


def train_idem(config: IDEMConfig, out_dir: str | Path | None = None, *, resume: bool = False,
               stop_after: int | None = None, progress: bool = True) -> TrainingState:
    """Run (or continue) iDEM/pDEM training under ``config``.

    Args:
        out_dir: where checkpoints go (written after every outer iteration by rank 0);
            ``None`` keeps everything in memory (notebook demonstrations).
        resume: continue from ``out_dir/checkpoint.pt``; a missing checkpoint is an error.
        stop_after: stop after this many outer iterations in this call (a session's share
            of a long run); the final checkpoint then continues where this one stopped.

    Returns the final :class:`TrainingState` (its ``ema`` is the sampler to use).
    """
    energy = get_target(config.target)
    rank, world = _world()
    out = Path(out_dir) if out_dir is not None else None
    if resume:
        if out is None:
            raise CheckpointError("resume=True needs out_dir")
        state = load_state(out, config, energy)
    else:
        state = initial_state(config, energy)
    model: nn.Module = state.model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(state.model)
    reference = evaluation_reference(config.target, config.n_eval, torch.Generator().manual_seed(config.seed + 7))

    if len(state.buffer) == 0:
        # the untrained network's samples seed the buffer: no data is ever used
        state.buffer.add(sample_model(state.ema, config, energy, config.n_refill, state.generator))
    last = config.n_outer if stop_after is None else min(config.n_outer, state.outer + stop_after)
    bar = tqdm(range(state.outer, last), desc=f"iDEM {config.target}", disable=not progress or rank != 0,
               initial=state.outer, total=config.n_outer)
    per_step = config.energy_evaluations_per_step()
    for outer in bar:
        start = time.perf_counter()
        losses = []
        for _ in range(config.inner_steps):
            x0 = state.buffer.sample(config.batch_size, state.generator)
            loss = regression_loss(model, config, energy, x0, state.generator)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
            state.optimizer.step()
            _ema_update(state.ema, state.model, config.ema_decay)
            losses.append(float(loss.detach()))
        state.energy_evaluations += _all_sum(config.inner_steps * per_step)
        state.buffer.add(sample_model(state.ema, config, energy, config.n_refill, state.generator))
        state.outer = outer + 1
        state.wall_time += time.perf_counter() - start
        record = {"outer": float(state.outer), "loss": sum(losses) / len(losses),
                  "energy_evaluations": float(state.energy_evaluations)}
        state.history.append(record)
        # evaluate on schedule, at the end, and when this call stops early (so every saved
        # checkpoint has metrics for the weights it holds)
        if rank == 0 and (state.outer % config.eval_every == 0 or state.outer == last):
            eval_gen = torch.Generator().manual_seed(config.seed + 10_007 * state.outer)
            with torch.no_grad():
                x = sample_model(state.ema, config, energy, config.n_eval, eval_gen)
            result = {"outer": float(state.outer), "energy_evaluations": float(state.energy_evaluations),
                      **evaluate_samples(energy, x, reference, eval_gen)}
            state.evaluations.append(result)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                torch.save(x.float().clone(), out / "samples.pt")  # the evaluated samples, for notebooks
            bar.set_postfix({k: f"{v:.3g}" for k, v in result.items() if k in ("energy_w2", "x_w2", "modes_covered",
                                                                             "distance_tvd")})
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"iDEM loss became non-finite at outer iteration {state.outer}; lower lr")
        if out is not None and rank == 0:
            save_checkpoint(state, config, out)
    bar.close()
    check_ranks_in_sync(state.model)
    return state


# ----------------------------------------------------------------------------------------
# the honest baseline: MCMC with the same number of energy evaluations
# ----------------------------------------------------------------------------------------


def equal_budget_mcmc(config: IDEMConfig, n_energy_evaluations: int, n_chains: int | None = None,
                      kernel: str = "mala", progress: bool = True, max_steps: int = 20_000) -> dict[str, float]:
    """Run ``n_chains`` MCMC chains (one energy-and-force evaluation per chain and step) for
    ``n_energy_evaluations // n_chains`` steps and evaluate their final states like a sampler.

    The chains start where iDEM's reverse SDE starts, from the prior N(0, sigma_1^2 I)
    (centre-of-mass free), so both methods get the same information: the energy, its
    forces, and the same number of evaluations. The first half of the steps adapts the step
    size; the final state of every chain is one sample (``n_chains`` defaults to
    ``config.n_eval``, the number of samples iDEM is evaluated on, or more when that would
    need more than ``max_steps`` steps per chain). Returns the metrics of
    :func:`evaluate_samples` plus ``"steps"``, ``"n_chains"``, ``"energy_evaluations"``,
    ``"acceptance"`` and ``"wall_time_s"``.
    """
    from boltzlab.mcmc import run_mcmc

    energy = get_target(config.target)
    # more chains rather than more steps once chains are long enough to equilibrate locally:
    # the same evaluations, better vectorised (and every extra chain is another sample)
    n_chains = n_chains or max(config.n_eval, -(-n_energy_evaluations // max_steps))
    n_steps = n_energy_evaluations // n_chains
    if n_steps < 2:
        raise TrainingConfigError(f"a budget of {n_energy_evaluations} evaluations gives {n_chains} chains "
                                  f"fewer than 2 steps each")
    generator = torch.Generator().manual_seed(config.seed + 99)
    x0 = sample_prior(config.schedule, n_chains, energy.dim, project=_projection(energy), generator=generator)
    # a step size of the order of the smallest length scale; adaptation takes it from there
    result = run_mcmc(energy, x0.double(), n_steps, kernel=kernel, step_size=1e-3, burn_in=n_steps // 2,
                      thin=n_steps - n_steps // 2, generator=generator, progress=progress, keep_energy_trace=False)
    x = result.samples[-1].float()
    reference = evaluation_reference(config.target, config.n_eval, torch.Generator().manual_seed(config.seed + 7))
    return {"steps": float(n_steps), "n_chains": float(n_chains), "energy_evaluations": float(result.n_energy_evaluations),
            "acceptance": float(result.acceptance.mean()), "wall_time_s": round(result.wall_time, 1),
            **evaluate_samples(energy, x, reference, torch.Generator().manual_seed(config.seed + 8))}


def write_baseline(out_dir: str | Path, progress: bool = True) -> dict[str, float]:
    """Run :func:`equal_budget_mcmc` for the checkpoint in ``out_dir`` with the energy
    evaluations it used, and save the result, with that ``"budget"``, as ``out_dir/mcmc_baseline.json``."""
    payload = _load_payload(Path(out_dir))
    config = IDEMConfig(**payload["config"])
    if not (Path(out_dir) / "samples.pt").is_file():
        # the final evaluation's samples again: same EMA weights, same generator seed
        sampler = _sampler_from_payload(payload)
        eval_gen = torch.Generator().manual_seed(config.seed + 10_007 * payload["outer"])
        torch.save(sampler.sample(config.n_eval, eval_gen).float(), Path(out_dir) / "samples.pt")
    budget = int(payload["energy_evaluations"])
    # the budget, not the evaluations spent (chains x steps rounds it down), identifies the run
    result = {**equal_budget_mcmc(config, budget, progress=progress), "budget": float(budget)}
    (Path(out_dir) / "mcmc_baseline.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def train_to_completion(config: IDEMConfig, out_dir: str | Path, *, baseline: bool = True,
                        progress: bool = True) -> Path:
    """Train ``config`` into ``out_dir`` to its last outer iteration, continuing the run found
    there (it must have the same config) instead of starting again, then write the
    equal-budget MCMC baseline unless ``out_dir`` already holds one for the same number of
    energy evaluations. Returns ``out_dir``, laid out like a shipped checkpoint.

    Because stop-and-continue equals an uninterrupted run, a run killed after hours (a closed
    laptop, a session that ended) loses at most one outer iteration; calling this again picks
    it up. The command line's ``--auto-resume --baseline`` does the same.
    """
    out = Path(out_dir)
    resume = (out / CHECKPOINT).is_file()
    if resume and progress:
        done = _load_payload(out)["outer"]
        print(f"{config.target}: continuing the run in {out} after {done}/{config.n_outer} outer iterations")
    state = train_idem(config, out, resume=resume, progress=progress)
    if baseline and _world()[0] == 0:
        current_baseline(out, state.energy_evaluations, progress=progress)
    return out


def current_baseline(out_dir: Path, budget: int, progress: bool = True) -> dict[str, float]:
    """``out_dir/mcmc_baseline.json`` if it was run for ``budget`` energy evaluations, else a
    fresh :func:`write_baseline` (the MCMC runs take minutes to half an hour per target)."""
    saved = out_dir / "mcmc_baseline.json"
    if saved.is_file():
        result = json.loads(saved.read_text())
        if result.get("budget") == budget:
            if progress:
                print(f"{saved}: already run for this checkpoint's {budget:.3g} evaluations; kept")
            return result
    return write_baseline(out_dir, progress=progress)


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise TrainingConfigError(f"--set expects FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    if key not in IDEMConfig.__dataclass_fields__:
        raise TrainingConfigError(f"unknown config field {key!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def main(argv: list[str] | None = None) -> int:
    """``python -m boltzlab train TARGET --out DIR [--resume] [--stop-after N] [--set FIELD=VALUE ...]``."""
    parser = argparse.ArgumentParser(prog="python -m boltzlab train", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(CONFIGS))
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue DIR's run if it has a checkpoint, else start one (restartable)")
    parser.add_argument("--stop-after", type=int, default=None, help="outer iterations to run in this call")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set n_outer=200 --set method=pdem")
    parser.add_argument("--baseline", action="store_true",
                        help="after training, run MCMC with the same number of energy evaluations "
                             "and write DIR/mcmc_baseline.json (kept if DIR already holds one for this budget)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    overrides = dict(_parse_override(s) for s in args.set)
    if args.seed is not None:
        overrides["seed"] = args.seed
    config = config_for(args.target, **overrides)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = _world()[0]
    resume = args.resume or (args.auto_resume and (args.out / CHECKPOINT).is_file())
    try:
        state = train_idem(config, args.out, resume=resume, stop_after=args.stop_after,
                           progress=not args.no_progress)
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0:
        final = state.evaluations[-1] if state.evaluations else {}
        print(json.dumps({"outer": state.outer, "energy_evaluations": state.energy_evaluations,
                          "wall_time_s": round(state.wall_time, 1), **final}))
        if args.baseline:
            baseline = current_baseline(args.out, state.energy_evaluations, progress=not args.no_progress)
            print(json.dumps({"mcmc_baseline": baseline}))
    return 0
