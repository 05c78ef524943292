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
import subprocess
import sys
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
    SDE_INCREMENTS,
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
from boltzlab.training.compiled import compile_wanted, maybe_compiled

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
    # variance added per reverse-SDE step: "euler" g(t)^2 dt (what the shipped checkpoints were
    # trained with) or "exact" sigma_t^2 - sigma_{t-dt}^2 (boltzlab.diffusion.reverse_sde_sample)
    sde_increment: str = "euler"

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
        if self.sde_increment not in SDE_INCREMENTS:
            raise TrainingConfigError(f"unknown sde_increment {self.sde_increment!r}; use one of "
                                      f"{', '.join(SDE_INCREMENTS)}")
        if self.estimator not in ("lse", "blended"):
            raise TrainingConfigError(f"unknown estimator {self.estimator!r}; use 'lse' or 'blended'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainingConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        GeometricNoiseSchedule(self.sigma_min, self.sigma_max)  # validates the schedule

    @property
    def schedule(self) -> GeometricNoiseSchedule:
        return GeometricNoiseSchedule(self.sigma_min, self.sigma_max)

    def energy_evaluations_per_step(self) -> int:
        """Target energies (each with its forces) evaluated per regression step (all ranks together)."""
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


# The sizes of the public iDEM code (repository jarridrb/DEM, commit 26c930b:
# configs/model/dem.yaml and configs/experiment/{dw4,lj13,lj55}_idem.yaml): EGNN hidden 128
# with 3 (DW-4) or 5 (LJ) layers; geometric schedule sigma_min/sigma_max 1e-5/3, 0.01/2, 0.5/4;
# K = 1000, 1000, 100 copies; scores clipped per particle at norm 20; batch 512 (128 for
# LJ-55) from a buffer of 10,000; 1000 new samples per outer iteration (1024 default, 128
# for LJ-55); 1000 integration steps; Adam lr 1e-3; no EMA (use_ema: false); LJ-55 trains
# 2000 epochs. Not in those files, taken as commonly re-run: 100 regression steps per outer
# iteration, 1000 outer iterations (DW-4, LJ-13) and gradient clipping at 0.5.
# What this code cannot express yet (so the preset is the paper's sizes, not its exact
# method): lambda(t) = 1 (NoLambdaWeighter; here sigma_t^2 + local_scale^2 with the
# ScaledScore preconditioning), diffusion_scale 0.9 (LJ-13) and 0.5 (LJ-55), and LJ-55's
# negative-time steps.
PAPER_CONFIGS: dict[str, IDEMConfig] = {
    "dw4": replace(CONFIGS["dw4"], hidden=128, n_layers=3, sigma_min=1e-5, sigma_max=3.0, n_mc=1000,
                   estimator="lse", max_norm=20.0, batch_size=512, lr=1e-3, grad_clip=0.5, ema_decay=0.0,
                   n_outer=1000, inner_steps=100, n_refill=1000, sde_steps=1000, buffer_capacity=10_000),
    "lj13": replace(CONFIGS["lj13"], hidden=128, n_layers=5, sigma_min=0.01, sigma_max=2.0, n_mc=1000,
                    estimator="lse", max_norm=20.0, batch_size=512, lr=1e-3, grad_clip=0.5, ema_decay=0.0,
                    n_outer=1000, inner_steps=100, n_refill=1000, sde_steps=1000, buffer_capacity=10_000),
    "lj55": replace(CONFIGS["lj55"], hidden=128, n_layers=5, sigma_min=0.5, sigma_max=4.0, n_mc=100,
                    estimator="lse", max_norm=20.0, batch_size=128, lr=1e-3, grad_clip=0.5, ema_decay=0.0,
                    n_outer=2000, inner_steps=100, n_refill=128, sde_steps=1000, buffer_capacity=10_000),
}
PRESETS: dict[str, dict[str, IDEMConfig]] = {"course": CONFIGS, "paper": PAPER_CONFIGS}


def config_for(target: str, preset: str = "course", **overrides: Any) -> IDEMConfig:
    """The config of ``target`` in ``preset`` ("course": the shipped CPU configs, "paper": the
    public iDEM code's sizes, :data:`PAPER_CONFIGS`) with ``overrides`` applied (e.g. ``n_outer=5``)."""
    if preset not in PRESETS:
        raise TrainingConfigError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    configs = PRESETS[preset]
    if target not in configs:
        raise TrainingConfigError(f"no iDEM config for {target!r} in preset {preset!r}; known: {', '.join(configs)}")
    unknown = set(overrides) - set(IDEMConfig.__dataclass_fields__)
    if unknown:
        raise TrainingConfigError(f"unknown config fields: {', '.join(sorted(unknown))}")
    return replace(configs[target], **overrides)


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


def regression_target(config: IDEMConfig, energy: Energy, x0: Tensor,
                      generator: torch.Generator, compile: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Noised points and their regression targets for buffer states ``x0`` (B, dim).

    Returns ``x_t`` (B, dim), ``t`` (B,) and the target: for iDEM the clipped Monte Carlo
    score (B, dim) from one streamed pass of the fused estimator (``compile`` as in
    :func:`boltzlab.estimators.mc_score`); for pDEM the noised-energy estimate (B,). No
    gradients; this is where every target-energy evaluation happens.
    """
    schedule = config.schedule
    t = sample_times(x0.shape[0], generator=generator, t_min=config.t_min, dtype=x0.dtype)
    x_t, _ = perturb(x0, t, schedule, project=_projection(energy), generator=generator)
    sigma = schedule.std(t)
    with torch.no_grad():
        if config.method == "pdem":
            return x_t, t, noised_energy_estimate(energy, x_t, sigma, config.n_mc, generator)
        extra = {"local_scale": config.local_scale} if config.estimator == "blended" else {}
        target = mc_score(energy, x_t, sigma, config.n_mc, generator=generator, max_norm=config.max_norm,
                          estimator=config.estimator, compile=compile, **extra)  # type: ignore[arg-type]
    return x_t, t, target


def target_loss(model: nn.Module, config: IDEMConfig, energy: Energy, x_t: Tensor, t: Tensor,
                target: Tensor) -> Tensor:
    """The weighted regression of the model onto :func:`regression_target`'s targets (a scalar).

    iDEM: mean of lambda(t) |s_theta(x_t, t) - target|^2 with lambda = sigma_t^2 + local_scale^2
    (:class:`~boltzlab.diffusion.ScaledScore`'s weight: an order-one loss at every t); pDEM:
    mean of (E_theta(x_t, t) - target)^2 / kT^2.
    """
    if config.method == "pdem":
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        # energies in kT units, equally weighted over t (their scale does not blow up at small t)
        return ((inner.energy(x_t, t) - target).pow(2) / energy.kT**2).mean()
    weight = config.schedule.variance(t) + config.local_scale**2
    return (weight * (model(x_t, t) - target).pow(2).sum(-1)).mean()


def regression_loss(model: nn.Module, config: IDEMConfig, energy: Energy, x0: Tensor,
                    generator: torch.Generator) -> Tensor:
    """One inner-loop loss on buffer states ``x0`` (B, dim): :func:`regression_target` then
    :func:`target_loss`."""
    x_t, t, target = regression_target(config, energy, x0, generator)
    return target_loss(model, config, energy, x_t, t, target)


def sample_model(model: nn.Module, config: IDEMConfig, energy: Energy, n: int,
                 generator: torch.Generator | None = None, sde_steps: int | None = None,
                 progress: bool = False, forward: nn.Module | None = None) -> Tensor:
    """n samples from the reverse SDE of ``model``: (n, dim). Costs no energy evaluations.

    ``forward`` (for example ``torch.compile(model)``) computes the score in place of ``model``;
    ``config.sde_increment`` picks the step's variance increment."""
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
        score = forward if forward is not None else model
    x = reverse_sde_sample(score, config.schedule, x1, sde_steps or config.sde_steps, project=project,
                           generator=generator, progress=progress, increment=config.sde_increment)
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


def rank_share(total: int, rank: int, world: int) -> int:
    """Rank ``rank``'s part of ``total`` items split over ``world`` ranks as evenly as possible
    (the first ``total % world`` ranks take one more)."""
    return total // world + (1 if rank < total % world else 0)


def initial_state(config: IDEMConfig, energy: Energy) -> TrainingState:
    """A fresh model (initialised from ``config.seed``), its EMA, Adam, and an empty buffer
    (this rank's share of ``buffer_capacity`` under data parallelism)."""
    rank, world = _world()
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_model(config, energy)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)
    buffer = ReplayBuffer(max(1, rank_share(config.buffer_capacity, rank, world)), energy.dim)
    return TrainingState(model, ema, optimizer, buffer, generator)


def gather_rank_states(state: TrainingState) -> list[dict[str, Any]] | None:
    """Every rank's buffer and generator state, gathered on rank 0 (a collective: all ranks
    call it); None on other ranks and in single-process runs."""
    rank, world = _world()
    if world == 1:
        return None
    mine = {"buffer": state.buffer.state_dict(), "generator": state.generator.get_state()}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered if rank == 0 else None


def save_checkpoint(state: TrainingState, config: IDEMConfig, out_dir: Path,
                    rank_states: list[dict[str, Any]] | None = None) -> Path:
    """Write ``checkpoint.pt`` (atomically), ``config.json`` and ``metrics.json`` into ``out_dir``.

    Under data parallelism ``rank_states`` (from :func:`gather_rank_states`) holds every rank's
    buffer and generator, so a resumed run continues each rank exactly."""
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
        "world_size": 1 if rank_states is None else len(rank_states),
        "rank_states": rank_states,
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
    rank, world = _world()
    saved_world = payload.get("world_size", 1)
    if saved_world != world:
        raise CheckpointError(f"checkpoint at {path} was trained with {saved_world} process(es); "
                              f"resume it with --procs {saved_world}, not {world}")
    own = payload["rank_states"][rank] if world > 1 else payload
    state = initial_state(config, energy)
    state.model.load_state_dict(payload["model"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.buffer.load_state_dict(own["buffer"])
    state.generator.set_state(own["generator"])
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


def _all_mean(value: float) -> float:
    """The mean of ``value`` over ranks (the loss of the global batch when shares are equal)."""
    _, world = _world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


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


PHASES: tuple[str, ...] = ("target", "network", "optimizer", "refill", "evaluation", "checkpoint")
"""The parts of an outer iteration whose wall-clock seconds every history record keeps
(``seconds_PHASE``): target estimation (buffer draw, noising, Monte Carlo targets), the
network's forward and backward pass, the optimiser (gradient clipping, Adam, EMA), the
reverse-SDE refill, the evaluation, and gathering the ranks' states for the checkpoint
(writing it happens after the record is made)."""


class PhaseTimer:
    """Wall-clock seconds per phase: ``with timer("target"): ...``; ``timer.seconds`` maps
    each of :data:`PHASES` to its total."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._phase = ""
        self._start = 0.0

    def __call__(self, phase: str) -> "PhaseTimer":
        if phase not in self.seconds:
            raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
        self._phase = phase
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._phase] += time.perf_counter() - self._start


def train_idem(config: IDEMConfig, out_dir: str | Path | None = None, *, resume: bool = False,
               stop_after: int | None = None, progress: bool = True, compile: bool | None = None) -> TrainingState:
    """Run (or continue) iDEM/pDEM training under ``config``.

    Args:
        out_dir: where checkpoints go (written after every outer iteration by rank 0);
            ``None`` keeps everything in memory (notebook demonstrations).
        resume: continue from ``out_dir/checkpoint.pt``; a missing checkpoint is an error.
        stop_after: stop after this many outer iterations in this call (a session's share
            of a long run); the final checkpoint then continues where this one stopped.
        compile: run the score network through torch.compile (training forward and the
            refill's sampler); None decides by :func:`boltzlab.training.compiled.compile_wanted`.
            It changes float32 rounding only, not the algorithm.

    Under data parallelism (``torchrun``, or ``python -m boltzlab train ... --procs P``) the
    run is the same algorithm with the same global sizes: each of the P ranks takes
    ``batch_size / P`` points per regression step (DDP averages the gradients), refills its
    own buffer (a 1/P share of ``buffer_capacity``) with its share of ``n_refill``, and the
    checkpoint keeps every rank's buffer and random state.

    Returns the final :class:`TrainingState` (its ``ema`` is the sampler to use).
    """
    energy = get_target(config.target)
    rank, world = _world()
    if config.batch_size % world:
        raise TrainingConfigError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
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
    # automatically only for the EGNN, where compiling was measured to pay (training/compiled.py)
    auto_steps = config.n_outer * config.inner_steps if config.network == "egnn" else 0
    compiled = compile_wanted(compile, auto_steps) and config.method == "idem"
    train_forward = maybe_compiled(model, compiled)
    sample_forward = maybe_compiled(state.ema, compiled)
    reference = evaluation_reference(config.target, config.n_eval, torch.Generator().manual_seed(config.seed + 7))
    local_batch = config.batch_size // world
    local_refill = max(1, rank_share(config.n_refill, rank, world))

    if len(state.buffer) == 0:
        # the untrained network's samples seed the buffer: no data is ever used
        state.buffer.add(sample_model(state.ema, config, energy, local_refill, state.generator))
    last = config.n_outer if stop_after is None else min(config.n_outer, state.outer + stop_after)
    bar = tqdm(range(state.outer, last), desc=f"iDEM {config.target}", disable=not progress or rank != 0,
               initial=state.outer, total=config.n_outer)
    per_step = local_batch * config.n_mc
    for outer in bar:
        start = time.perf_counter()
        timer = PhaseTimer()
        losses = []
        for _ in range(config.inner_steps):
            with timer("target"):
                x0 = state.buffer.sample(local_batch, state.generator)
                # a long compiled run compiles the estimator's blocks too, whatever their size
                x_t, t, target = regression_target(config, energy, x0, state.generator, compile=compiled or None)
            with timer("network"):
                loss = target_loss(train_forward, config, energy, x_t, t, target)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with timer("optimizer"):
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
                state.optimizer.step()
                _ema_update(state.ema, state.model, config.ema_decay)
            losses.append(float(loss.detach()))
        state.energy_evaluations += _all_sum(config.inner_steps * per_step)
        with timer("refill"):
            state.buffer.add(sample_model(state.ema, config, energy, local_refill, state.generator,
                                          forward=sample_forward))
        state.outer = outer + 1
        record = {"outer": float(state.outer), "loss": _all_mean(sum(losses) / len(losses)),
                  "energy_evaluations": float(state.energy_evaluations)}
        # evaluate on schedule, at the end, and when this call stops early (so every saved
        # checkpoint has metrics for the weights it holds)
        if rank == 0 and (state.outer % config.eval_every == 0 or state.outer == last):
            with timer("evaluation"):
                eval_gen = torch.Generator().manual_seed(config.seed + 10_007 * state.outer)
                with torch.no_grad():
                    x = sample_model(state.ema, config, energy, config.n_eval, eval_gen, forward=sample_forward)
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
        rank_states = None
        if out is not None:
            with timer("checkpoint"):
                rank_states = gather_rank_states(state)
        # training time, as before phases were timed: without evaluation and checkpointing
        state.wall_time += time.perf_counter() - start - timer.seconds["evaluation"] - timer.seconds["checkpoint"]
        record.update({f"seconds_{phase}": round(sec, 4) for phase, sec in timer.seconds.items()})
        state.history.append(record)
        if out is not None and rank == 0:
            save_checkpoint(state, config, out, rank_states)
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


def _launch_processes(procs: int, argv: list[str]) -> int:
    """Re-run this command as ``procs`` data-parallel processes (torchrun, gloo on CPUs), one
    torch thread each: the measured fastest use of a 2-core machine (benchmarks/README.md)."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--procs":
            skip = True
        elif not arg.startswith("--procs="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "boltzlab", "train", *rest]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    """``python -m boltzlab train TARGET --out DIR [--resume] [--stop-after N] [--set FIELD=VALUE ...]``."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m boltzlab train", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, help="checkpoint directory (required unless --profile)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="course",
                        help="course: the shipped CPU configs; paper: the public iDEM code's sizes")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue DIR's run if it has a checkpoint, else start one (restartable)")
    parser.add_argument("--stop-after", type=int, default=None, help="outer iterations to run in this call")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set n_outer=200 --set method=pdem")
    parser.add_argument("--procs", type=int, default=1,
                        help="data-parallel processes (gloo, one thread each); 2 uses both cores of a 2-core machine")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the score network (default: for runs of >= 1000 regression steps, "
                             "or as BOLTZLAB_COMPILE says)")
    parser.add_argument("--profile", action="store_true",
                        help="print where an outer iteration of this config spends its time, and exit")
    parser.add_argument("--profile-steps", type=int, default=5,
                        help="regression steps and SDE steps timed by --profile (scaled to the config)")
    parser.add_argument("--profile-baseline", action="store_true",
                        help="with --profile: the loop as before the fused estimator (materialised targets, "
                             "eager), the baseline of benchmarks/bench_training.py")
    parser.add_argument("--baseline", action="store_true",
                        help="after training, run MCMC with the same number of energy evaluations "
                             "and write DIR/mcmc_baseline.json (kept if DIR already holds one for this budget)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error(f"--procs must be >= 1, got {args.procs}")
    if args.out is None and not args.profile:
        parser.error("--out DIR is required (or use --profile)")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.procs > 1 and not distributed:
        return _launch_processes(args.procs, argv)
    try:
        overrides = dict(_parse_override(s) for s in args.set)
        if args.seed is not None:
            overrides["seed"] = args.seed
        config = config_for(args.target, args.preset, **overrides)
    except TrainingConfigError as err:
        parser.error(str(err))
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = _world()[0]
    try:
        if args.profile:
            from boltzlab.training.profile import profile_training

            report = profile_training(config, regression_steps=args.profile_steps, sde_steps=args.profile_steps,
                                      compile=args.compile, progress=not args.no_progress,
                                      baseline=args.profile_baseline)
            if rank == 0:
                print(report.table())
                print(json.dumps(report.summary()))
            return 0
        resume = args.resume or (args.auto_resume and (args.out / CHECKPOINT).is_file())
        state = train_idem(config, args.out, resume=resume, stop_after=args.stop_after,
                           progress=not args.no_progress, compile=args.compile)
    except (CheckpointError, TrainingConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
