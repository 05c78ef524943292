r"""The iDEM score network and its sampler: what a checkpoint needs to make samples.

- :func:`build_model`: the score network of a config, ``model(x (B, dim), t (B,)) -> (B, dim)``
  (an EGNN or MLP inside :class:`~boltzlab.diffusion.ScaledScore`; NEM: a scalar energy network
  whose score is -grad E_theta / kT);
- :func:`sample_model`: n samples from its reverse SDE, x_{t-dt} = x_t + g^2 s dt + g sqrt(dt) z,
  started from N(0, sigma_1^2 I), then the config's negative-time steps on the target itself
  (:func:`negative_time`);
- :func:`model_score`: the score function it integrates (chunked; NEM's through autograd), also
  what :func:`boltzlab.training.ablation.denoise_from_reference` runs from noised data;
- :func:`sampling_energy_evaluations`: what those steps cost in target energies.

Used by the training loop (:mod:`boltzlab.training.idem`) and by the checkpoints
(:mod:`boltzlab.training.checkpoints`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from boltzlab.diffusion import (
    ScaledEnergy,
    ScaledScore,
    ScoreFn,
    reverse_sde_sample,
    sample_prior,
)
from boltzlab.energies import Energy, PairPotential
from boltzlab.estimators import clip_for
from boltzlab.training.idem_config import IDEMConfig, TrainingConfigError

SCORE_CHUNK = 512
"""Largest batch the sampler passes to a score network at once (see :func:`score_chunk`)."""

SCORE_CHUNK_PAIRS = 65_536
"""For particle systems, at most this many ordered pairs (samples x n (n - 1)) per network call.
An EGNN's pair tensors for many samples do not fit the CPU caches: one eager forward pass (one
thread) of 2000 LJ-13 samples (64 x 4) took about 3x as long as four of 500, and 512 LJ-55
samples (32 x 3) 3.4x as long as 19 calls of 27."""


def score_chunk(energy: Energy) -> int:
    """Samples per network call when sampling ``energy``: :data:`SCORE_CHUNK`, and for a particle
    system of n particles at most :data:`SCORE_CHUNK_PAIRS` / (n (n - 1)) (at least 8)."""
    if isinstance(energy, PairPotential):
        n = energy.n_particles
        return max(8, min(SCORE_CHUNK, SCORE_CHUNK_PAIRS // (n * (n - 1))))
    return SCORE_CHUNK


def _projection(energy: Energy):
    if isinstance(energy, PairPotential):
        return energy.remove_com
    return None


def build_model(config: IDEMConfig, energy: Energy) -> nn.Module:
    """The score network of ``config``: ``model(x (B, dim), t (B,)) -> (B, dim)``.

    NEM wraps a scalar-energy network in :class:`~boltzlab.models.EnergyScore`, so the
    model also has ``model.energy(x, t) -> (B,)``.
    """
    from boltzlab import models

    project = _projection(energy)
    if config.method == "nem":
        if config.network != "mlp":
            raise TrainingConfigError("NEM is implemented with the MLP energy network only; use network='mlp'")
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


def chunked_score(score: ScoreFn, chunk: int) -> ScoreFn:
    """``score`` evaluated ``chunk`` samples at a time (:func:`score_chunk`): the same function of
    (x (B, dim), t (B,)), since the networks treat every sample on its own."""
    def chunked(x: Tensor, t: Tensor) -> Tensor:
        if x.shape[0] <= chunk:
            return score(x, t)
        return torch.cat([score(xc, tc) for xc, tc in zip(x.split(chunk), t.split(chunk))])
    return chunked


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
    x = reverse_sde_sample(model_score(model, config, energy, forward), config.schedule, x1,
                           sde_steps or config.sde_steps, project=project, generator=generator,
                           progress=progress, increment=config.sde_increment,
                           diffusion_scale=config.diffusion_scale)
    model.train(was_training)
    return negative_time(config, energy, x)


def model_score(model: nn.Module, config: IDEMConfig, energy: Energy, forward: nn.Module | None = None) -> ScoreFn:
    """The score function the sampler integrates: ``forward`` (or ``model``) evaluated
    :func:`score_chunk` samples at a time, s(x (B, dim), t (B,)) -> (B, dim). NEM's is
    -grad E_theta / kT, which needs autograd even inside ``torch.no_grad``."""
    if config.method == "nem":
        def score(x: Tensor, t: Tensor) -> Tensor:
            with torch.enable_grad():
                return model(x, t).detach()
    else:
        score = forward if forward is not None else model
    return chunked_score(score, score_chunk(energy))


def negative_time(config: IDEMConfig, energy: Energy, x: Tensor) -> Tensor:
    """``config.negative_time_steps`` steps x <- x + eta clip(grad log p(x)) on the target itself
    (eta = ``config.negative_time_step``, clipped per particle at ``config.max_norm`` when set):
    the public iDEM code's LJ-55 sampler ends with 10 of them. (n, dim) -> (n, dim); each step
    costs n energy (and force) evaluations (:func:`sampling_energy_evaluations`)."""
    if config.negative_time_steps == 0:
        return x
    project = _projection(energy)
    for _ in range(config.negative_time_steps):
        step = energy.forces(x) / energy.kT
        step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)  # an overlapping pair: no step
        if config.max_norm is not None:
            step = clip_for(energy, step, config.max_norm)
        x = x + config.negative_time_step * step
        if project is not None:
            x = project(x)
    return x


def sampling_energy_evaluations(config: IDEMConfig, n: int) -> int:
    """Target energies one call of :func:`sample_model` spends on n samples (the negative-time steps)."""
    return n * config.negative_time_steps
