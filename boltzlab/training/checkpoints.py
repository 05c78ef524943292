r"""iDEM training state and checkpoints: save, resume, warm-start (a new phase) and load for sampling.

A run directory holds ``checkpoint.pt`` (everything a resumed run needs: weights, EMA, Adam,
buffer, random state, counters, evaluations, earlier phases), ``config.json`` and
``metrics.json`` (both derived from the checkpoint by :func:`write_run_files`). Stop and
continue equals an uninterrupted run with the same seed; under data parallelism every rank's
buffer and generator are saved (``rank_states``).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzlab.diffusion import ReplayBuffer
from boltzlab.energies import Energy, get_target
from boltzlab.training.idem_config import (
    CHECKPOINT,
    SHIPPED_DIR,
    CheckpointError,
    IDEMConfig,
)
from boltzlab.training.parallel import rank_and_world, rank_share
from boltzlab.training.sampler import build_model, sample_model


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
    cpu_time: float = 0.0  # this process's CPU seconds over whole outer iterations, summed over sessions
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per outer iteration
    evaluations: list[dict[str, float]] = field(default_factory=list)
    # earlier phases of a warm-started run (:func:`warm_start_state`): each one's config, the
    # outer iteration it handed over at and the directory it came from
    phases: list[dict[str, Any]] = field(default_factory=list)


def initial_state(config: IDEMConfig, energy: Energy) -> TrainingState:
    """A fresh model (initialised from ``config.seed``), its EMA, Adam, and an empty buffer
    (this rank's share of ``buffer_capacity`` under data parallelism)."""
    rank, world = rank_and_world()
    torch.manual_seed(config.seed)  # same initial weights on every rank
    model = build_model(config, energy)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 1_000_003 * rank)
    buffer = ReplayBuffer(max(1, rank_share(config.buffer_capacity, rank, world)), energy.dim)
    return TrainingState(model, ema, optimizer, buffer, generator)


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
        "cpu_time": state.cpu_time,
        "history": state.history,
        "evaluations": state.evaluations,
        "phases": state.phases,
        "world_size": 1 if rank_states is None else len(rank_states),
        "rank_states": rank_states,
    }
    return write_run_files(payload, out_dir)


def write_run_files(payload: dict[str, Any], out_dir: Path) -> Path:
    """Write a checkpoint ``payload`` (as :func:`save_checkpoint` builds it) to
    ``out_dir/checkpoint.pt`` atomically, with the ``config.json`` and ``metrics.json`` derived
    from it; returns the checkpoint's path."""
    tmp = out_dir / (CHECKPOINT + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out_dir / CHECKPOINT)
    (out_dir / "config.json").write_text(json.dumps(payload["config"], indent=2) + "\n")
    evaluations = payload["evaluations"]
    summary = {
        "target": payload["config"]["target"],
        "method": payload["config"]["method"],
        "outer_iterations": payload["outer"],
        "energy_evaluations": payload["energy_evaluations"],
        "training_wall_time_s": round(payload["wall_time"], 1),
        "training_cpu_time_s": round(payload.get("cpu_time", 0.0), 1),
        "final": evaluations[-1] if evaluations else None,
        "evaluations": evaluations,
    }
    if payload.get("phases"):
        summary["phases"] = payload["phases"]
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
    return _state_from_payload(payload, path, config, energy)


WARM_START_FIXED = ("target", "method", "network", "hidden", "n_layers", "data_scale", "local_scale",
                    "sigma_min", "sigma_max", "buffer_capacity")
"""Config fields a warm start keeps: they define the network (and its input and output scaling)
and the buffer. Everything else (the target's clip, K, the optimiser, the sampler) may change."""


def warm_start_state(path: Path, config: IDEMConfig, energy: Energy) -> TrainingState:
    """Start a new phase of training under ``config`` from the checkpoint in ``path`` (a run
    trained under another config): its weights, EMA, Adam moments, buffer, random state,
    counters (outer iterations, energy evaluations, wall and CPU time) and records carry over,
    so the new run's totals are those of both phases. The fields in :data:`WARM_START_FIXED`
    must agree; the learning rate becomes ``config.lr``. The earlier config is kept in
    ``state.phases`` (and in the new run's checkpoint and ``metrics.json``)."""
    payload = _load_payload(path)
    saved = IDEMConfig(**payload["config"])
    diff = {k: (getattr(saved, k), getattr(config, k)) for k in WARM_START_FIXED if getattr(saved, k) != getattr(config, k)}
    if diff:
        raise CheckpointError(f"cannot warm-start from {path}: these fields define the network or the buffer "
                              f"and must agree (saved, new): {diff}")
    state = _state_from_payload(payload, path, config, energy)
    for group in state.optimizer.param_groups:
        group["lr"] = config.lr
    source = path.parent if path.name == CHECKPOINT else path
    state.phases = [*state.phases, {"config": asdict(saved), "until_outer": payload["outer"], "from": str(source)}]
    return state


def _state_from_payload(payload: dict[str, Any], path: Path, config: IDEMConfig, energy: Energy) -> TrainingState:
    rank, world = rank_and_world()
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
    state.cpu_time = payload.get("cpu_time", 0.0)  # not recorded before the ablations needed it
    state.history = payload["history"]
    state.evaluations = payload["evaluations"]
    state.phases = payload.get("phases", [])
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
               progress: bool = False, forward: nn.Module | None = None) -> Tensor:
        """n samples from the reverse SDE, (n, dim); ``forward`` (e.g. the compiled model) as in
        :func:`~boltzlab.training.sampler.sample_model`."""
        return sample_model(self.model, self.config, self.energy, n, generator, sde_steps, progress, forward)


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
