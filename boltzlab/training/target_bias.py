"""Is the regression target right? Two measurements that need no trained sampler to be good.

1. **The virial identity, band by band.** For exact samples x_t of p_t (reference configurations
   plus N(0, sigma_t^2) noise) every correct score obeys E[(x_t - c) . grad log p_t(x_t)] =
   -(n - 1) d (:func:`boltzlab.metrics.score_virial`). :func:`virial_by_sigma` measures that
   expectation for any set of score functions at the same noised points: the iDEM Monte Carlo
   target (clipped as in training) for several K, a checkpoint's network, or a network trained on
   data. A target whose virial is above the exact value pushes particles apart on average; below,
   it pulls them together. A network regressed onto a biased target inherits its bias.
2. **The network's ceiling.** :func:`data_ceiling` trains the same network by denoising score
   matching on half of the reference set (exact samples, no energy evaluations) and samples it
   with the same reverse SDE, evaluated against the other half. If that meets a target the
   data-free sampler misses, the network and the sampler are not what limits it. The same
   function with ``regression="mc_target"`` regresses onto iDEM's own Monte Carlo target at the
   same exact points: whatever separates the two records is the target, not the buffer.

The records are written by

    python -m boltzlab ablate lj13 --target-virial boltzlab/data/checkpoints/lj13_phase3 --sigmas 0.03 0.1 0.2 0.3 0.5 1.0 2.0
    python -m boltzlab ablate lj13 --dsm-ceiling boltzlab/data/checkpoints/lj13_phase3
    python -m boltzlab ablate lj13 --mc-target-ceiling boltzlab/data/checkpoints/lj13_phase3

(``boltzlab/data/records/{target_virial,dsm_ceiling,mc_target_ceiling}_lj13.json``) and chapter
06 shows them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from boltzlab import metrics
from boltzlab.diffusion.dsm import fit_score_model
from boltzlab.energies import Energy, PairPotential
from boltzlab.kernels import mc_score_estimate
from boltzlab.training.checkpoints import TrainedSampler
from boltzlab.training.generative import TrainingHistory, run_training
from boltzlab.training.idem import (
    evaluate_samples,
    evaluation_reference,
    mc_target,
    regression_target,
    target_loss,
)
from boltzlab.training.sampler import _projection, build_model, sample_model

# f(x (B, dim) float64, t (B,), generator) -> (B, dim)
VirialScore = Callable[[Tensor, Tensor, torch.Generator], Tensor]

# the halves of the reference set: DSM trains on the first, everything is evaluated on the second
SPLIT_SEED = 123


def _particles(energy: Energy) -> tuple[int, int] | tuple[()]:
    """(n_particles, spatial_dim) of a particle system, () otherwise (for metrics.score_virial)."""
    return (energy.n_particles, energy.spatial_dim) if isinstance(energy, PairPotential) else ()


def reference_halves(target: str) -> tuple[Tensor, Tensor]:
    """The whole reference set of ``target`` split at random (seed :data:`SPLIT_SEED`) into two
    halves, ``(train, test)``, each (n / 2, dim)."""
    # the generator only matters for GMM-40, whose "reference set" is drawn exactly each time
    reference = evaluation_reference(target, None, torch.Generator().manual_seed(SPLIT_SEED))
    perm = torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(SPLIT_SEED))
    half = reference.shape[0] // 2
    return reference[perm[:half]], reference[perm[half:]]


def noised_reference(sampler: TrainedSampler, sigmas: list[float], n_points: int,
                     seed: int = 0) -> list[tuple[float, Tensor, Tensor]]:
    """``n_points`` exact samples of p_t per sigma in ``sigmas``: held-out reference configurations
    (the second half of :func:`reference_halves`) plus sigma N(0, I), centre-of-mass-free, drawn
    from a generator seeded ``seed``. Returns ``(sigma, x_t (n, dim) float64, t (n,))`` per sigma."""
    energy = sampler.energy
    _, test = reference_halves(sampler.config.target)
    x0 = test[:n_points].double()
    project = _projection(energy) or (lambda v: v)
    points = torch.Generator().manual_seed(seed)
    out = []
    for sigma in sigmas:
        x_t = project(x0 + sigma * project(torch.randn(x0.shape, generator=points, dtype=x0.dtype)))
        out.append((sigma, x_t, sampler.config.schedule.time_at_std(torch.full((x0.shape[0],), sigma, dtype=x0.dtype))))
    return out


def virial_by_sigma(sampler: TrainedSampler, scores: dict[str, VirialScore],
                    sigmas: list[float], n_points: int, seed: int = 0,
                    noised: list[tuple[float, Tensor, Tensor]] | None = None) -> list[dict[str, float]]:
    """Mean virial (1/n) sum_b (x_b - c_b) . s(x_b, t) of every score in ``scores`` at the same
    ``n_points`` exact samples of p_t per noise level sigma in ``sigmas``
    (:func:`noised_reference` with ``seed``, or ``noised`` when given), with the exact value
    -(n_particles - 1) d. A score is ``f(x (B, dim) float64, t (B,), generator) -> (B, dim)``;
    the scores' own draws come from a generator seeded ``seed + 1``.
    Returns one row per sigma: ``{"sigma", "exact", NAME: mean virial, ...}``."""
    energy = sampler.energy
    particles = _particles(energy)
    noised = noised_reference(sampler, sigmas, n_points, seed) if noised is None else noised
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for sigma, x_t, t in noised:
        row = {"sigma": sigma, "exact": metrics.virial_expectation(energy.dim, *particles)}
        for name, score in scores.items():
            values = metrics.score_virial(x_t, score(x_t, t, generator), *particles)
            row[name] = float(values.mean())
        rows.append(row)
    return rows


def mc_target_score(sampler: TrainedSampler, n_mc: int, repeats: int = 1) -> VirialScore:
    """The iDEM regression target of ``sampler``'s config with K = ``n_mc`` copies (its estimator:
    the fused LSE force form, or the blended force/noise form switching at ``blend_scale``;
    clipped per particle as in training by :func:`~boltzlab.training.idem.target_clip`),
    averaged over ``repeats`` independent draws: its mean is what a regression onto it
    converges to, so averaging shows the bias."""
    config, energy = replace(sampler.config, n_mc=n_mc), sampler.energy

    def score(x: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
        sigma = config.schedule.std(t)
        return torch.stack([mc_target(config, energy, x, sigma, generator) for _ in range(repeats)]).mean(0)
    return score


def network_score(model: torch.nn.Module) -> VirialScore:
    """A score network as a :func:`virial_by_sigma` score (float32 inside, float64 out)."""
    def score(x: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
        model.eval()
        with torch.no_grad():
            return model(x.float(), t.float()).double()
    return score


def target_virial_record(sampler: TrainedSampler, sigmas: list[float], n_points: int = 200,
                         ks: tuple[int, ...] = (1000, 4000, 32000), seed: int = 0) -> dict:
    """:func:`virial_by_sigma` for the checkpoint's network (``"network"``) and its training
    target at each K in ``ks`` (``"target_K"``, averaged over 32000 / (4 K) draws, at least 1),
    the smallest K's target without the clip (``"target_K_unclipped"``), and the targets' mean
    Kish ESS per sigma (``"ess_K"``). The record chapter 06 reads."""
    scores: dict[str, VirialScore] = {"network": network_score(sampler.model)}
    for k in ks:
        scores[f"target_{k}"] = mc_target_score(sampler, k, repeats=max(1, 32000 // k // 4))
    # the smallest K without any clip: what the clip does to the bias
    unclipped = replace(sampler, config=replace(sampler.config, max_norm=None, clip_sigma=0.0))
    scores[f"target_{ks[0]}_unclipped"] = mc_target_score(unclipped, ks[0], repeats=max(1, 32000 // ks[0] // 4))
    noised = noised_reference(sampler, sigmas, n_points, seed)
    rows = virial_by_sigma(sampler, scores, sigmas, n_points, seed, noised=noised)
    # the weights' ESS at the same points, with fresh copies
    generator = torch.Generator().manual_seed(seed + 2)
    for row, (sigma, x_t, _) in zip(rows, noised):
        for k in ks:
            est = mc_score_estimate(sampler.energy, x_t, torch.full((x_t.shape[0],), sigma, dtype=x_t.dtype), k,
                                    generator=generator)
            row[f"ess_{k}"] = float(est.ess.mean())
    return {"target": sampler.config.target, "n_points": n_points, "ks": list(ks), "seed": seed, "rows": rows}


REGRESSIONS = ("dsm", "mc_target")


def data_ceiling(sampler: TrainedSampler, n_steps: int, n_samples: int = 2000, seed: int = 0,
                 progress: bool = True, compile: bool = True, regression: str = "dsm") -> tuple[dict, torch.nn.Module]:
    """Train a fresh network of ``sampler``'s config (same architecture, schedule, output scaling)
    at noised configurations of the first reference half (exact samples of p_t), batch = the
    config's batch size, Adam at its learning rate with cosine decay, ``n_steps`` steps; sample
    ``n_samples`` with the config's reverse SDE and evaluate against the second half with
    :func:`~boltzlab.training.idem.evaluate_samples`. Returns the record and the network.

    ``regression="dsm"``: denoising score matching (the target -eps / sigma_t, whose conditional
    mean is the exact score). ``"mc_target"``: iDEM's own regression target at the same kind of
    points (:func:`~boltzlab.training.idem.regression_target`: K = ``n_mc`` copies, the training
    clip, the config's loss weight and gradient clipping). Same points, same network, same
    sampler: whatever separates the two is the Monte Carlo target, not the buffer."""
    config, energy = sampler.config, sampler.energy
    if not isinstance(energy, PairPotential):
        raise TypeError(f"data_ceiling evaluates particle systems (distance W2); {config.target!r} is not one")
    if regression not in REGRESSIONS:
        raise ValueError(f"unknown regression {regression!r}; use one of {', '.join(REGRESSIONS)}")
    train, test = reference_halves(config.target)
    torch.manual_seed(seed)  # the network's initialisation
    model = build_model(config, energy)
    start = time.perf_counter()
    if regression == "dsm":
        history = fit_score_model(model, train, config.schedule, n_steps, batch_size=config.batch_size, lr=config.lr,
                                  t_min=config.t_min, project=_projection(energy), seed=seed, progress=progress,
                                  desc="DSM on reference configurations")
    else:
        history = _fit_mc_target(model, sampler, train, n_steps, seed, progress)
    train_s = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        x = sample_model(model, config, energy, n_samples, torch.Generator().manual_seed(seed + 1),
                         forward=torch.compile(model) if compile else None)
    result = evaluate_samples(energy, x, test, torch.Generator().manual_seed(seed + 8))
    halves = metrics.distance_w2(train[:n_samples], test, energy.n_particles, energy.spatial_dim)
    losses = history.values["loss"][-200:]
    record = {"target": config.target, "regression": regression, "n_steps": n_steps, "n_samples": n_samples,
              "seed": seed, "train_configurations": train.shape[0], "test_configurations": test.shape[0],
              "train_seconds": round(train_s, 1), "final_loss": sum(losses) / len(losses),
              "metrics": result, "exact_halves_distance_w2": halves,
              "config": {k: v for k, v in asdict(replace(config)).items()
                         if k in ("hidden", "n_layers", "sigma_min", "sigma_max", "sde_steps", "diffusion_scale",
                                  "batch_size", "lr", "data_scale", "local_scale", "n_mc", "max_norm",
                                  "clip_sigma", "loss_weight")}}
    return record, model


def _fit_mc_target(model: torch.nn.Module, sampler: TrainedSampler, train: Tensor, n_steps: int, seed: int,
                   progress: bool) -> TrainingHistory:
    config, energy = sampler.config, sampler.energy
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)
    model.train()

    def step(_: int) -> dict[str, float]:
        x0 = train[torch.randint(train.shape[0], (config.batch_size,), generator=generator)]
        x_t, t, target = regression_target(config, energy, x0, generator)
        loss = target_loss(model, config, energy, x_t, t, target)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        return {"loss": loss.item()}

    return run_training(step, n_steps, progress=progress, desc="iDEM target at reference configurations")


RECORD_KINDS = ("target_virial", "dsm_ceiling", "mc_target_ceiling")


def load_record(kind: str, name: str, records_dir: Path | None = None) -> dict:
    """The saved record ``kind`` (one of :data:`RECORD_KINDS`) of the checkpoint directory
    ``name`` (e.g. ``"lj13"``), written by ``python -m boltzlab ablate TARGET --KIND CHECKPOINT``
    (``--target-virial``, ``--dsm-ceiling``, ``--mc-target-ceiling``)."""
    from boltzlab.training.ablation import RECORDS_DIR

    if kind not in RECORD_KINDS:
        raise ValueError(f"unknown record kind {kind!r}; use one of {', '.join(RECORD_KINDS)}")
    path = (records_dir or RECORDS_DIR) / f"{kind}_{name}.json"
    if not path.is_file():
        flag = "--" + kind.replace("_", "-")
        raise FileNotFoundError(f"no {kind} record for {name!r} at {path}; run `python -m boltzlab ablate TARGET "
                                f"{flag} boltzlab/data/checkpoints/{name}`")
    return json.loads(path.read_text())
