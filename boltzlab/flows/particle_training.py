r"""Train and evaluate the particle Boltzmann generator (:mod:`boltzlab.flows.equivariant`).

``python -m boltzlab train-flow {dw4,lj13} --out DIR [--auto-resume] [--seed S] [--set FIELD=VALUE]``

trains an :class:`~boltzlab.flows.equivariant.EquivariantCNF` by conditional flow matching on
the project's reference set (``boltzlab.reference.load_reference``), split once with
``split_seed`` into a training part and a held-out part that only the evaluation sees, then
draws ``n_eval`` samples with their exact ODE log-likelihood and reweights them to
exp(-E/kT). DIR receives

- ``config.json``   the :class:`ParticleFlowConfig` (written at the start, checked on resume)
- ``checkpoint.pt`` model, EMA model, optimiser, RNG state, step, CPU time (every
  ``checkpoint_every`` steps and at the end: a stopped run continues with ``--auto-resume``)
- ``metrics.json``  :func:`evaluate_particle_flow` of the EMA model: ``ess_per_sample`` (Kish
  ESS / n on ``n_eval`` samples), energy W2 before and after reweighting, distance TVD before
  and after resampling, the reference-vs-reference floor of both, the weights' tail and
  the ODE's convergence, and the training CPU time (``time.process_time``, summed over resumes)
- ``samples.pt``    the evaluated samples (float32), their log q and log w (float64)

The CPU time is the process's own (user + system) time, so it counts every thread; the
shipped runs used one thread (``OMP_NUM_THREADS=1``, ``--threads 1``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab.energies import PairPotential, get_target
from boltzlab.flows.equivariant import ALIGNMENTS, EquivariantCNF, flow_matching_loss, ode_convergence
from boltzlab.importance import importance_resample, sampler_log_weights
from boltzlab.metrics import distance_tvd, energy_w2, kish_ess, log_z_estimate, weighted_wasserstein_1d
from boltzlab.reference import load_reference
from boltzlab.validation import check_positive_int, parse_field_override

__all__ = [
    "CHECKPOINT",
    "CONFIGS",
    "ParticleFlowConfig",
    "ParticleFlowConfigError",
    "evaluate_particle_flow",
    "load_particle_flow",
    "reference_split",
    "shipped_particle_flow",
    "train_particle_flow",
]

CHECKPOINT = "checkpoint.pt"
TARGETS = ("dw4", "lj13")
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "checkpoints"
EVAL_FIELDS = ("n_eval", "ode_steps", "eval_batch")  # fields a resumed run may change


class ParticleFlowConfigError(ValueError):
    """A config field with an impossible value, or a run directory that does not match its config."""


@dataclass(frozen=True)
class ParticleFlowConfig:
    """Everything that defines a run (saved as config.json).

    Data: ``n_train`` training and ``n_heldout`` held-out reference samples from one seeded
    permutation (``split_seed``) of the reference set. Model: see :class:`EquivariantCNF`;
    ``prior_std`` 0 means the training data's RMS coordinate. Training: Adam, learning rate
    cosine-decayed from ``lr`` to ``lr / 20`` over ``n_steps``, gradient norm clipped at
    ``max_grad_norm``, an exponential moving average of the weights (``ema_decay``) used
    for sampling. Evaluation: ``n_eval`` samples, RK4 with ``ode_steps`` steps."""

    target: str
    n_train: int = 5000
    n_heldout: int = 5000
    split_seed: int = 0
    prior_std: float = 0.0
    hidden: int = 64
    n_layers: int = 4
    time_dim: int = 16
    max_period: float = 10.0
    alignment: str = "ot"
    batch_size: int = 256
    lr: float = 1e-3
    n_steps: int = 20_000
    max_grad_norm: float = 10.0
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    n_eval: int = 10_000
    ode_steps: int = 20
    eval_batch: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ParticleFlowConfigError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.alignment not in ALIGNMENTS:
            raise ParticleFlowConfigError(f"alignment must be one of {ALIGNMENTS}, got {self.alignment!r}")
        for name in ("n_train", "n_heldout", "hidden", "n_layers", "time_dim", "batch_size", "n_steps",
                     "checkpoint_every", "n_eval", "ode_steps", "eval_batch"):
            check_positive_int(getattr(self, name), name, ParticleFlowConfigError)
        if not (self.prior_std >= 0 and math.isfinite(self.prior_std)):
            raise ParticleFlowConfigError(f"prior_std must be >= 0 (0: the data's RMS), got {self.prior_std}")
        if not 0 <= self.ema_decay < 1:
            raise ParticleFlowConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not (self.lr > 0 and self.max_grad_norm > 0 and self.max_period > 0):
            raise ParticleFlowConfigError("lr, max_grad_norm and max_period must be positive")


# The pairing ("alignment"), measured on DW-4 with one thread (2026-12-06, this machine):
# - mean |x_1 - x_0|^2 of one batch of 256 pairs: "none" 46.7, "ot" 8.6, "equivariant" 3.8;
# - CPU time per training step (EGNN 64 x 4, batch 256): "none" 0.023 s, "ot" 0.024 s,
#   "equivariant" about 0.07 s (its pairing alone 0.047 s: 256^2 pairs x 24 permutations);
# - pilots of 2000 steps (50 s CPU each), evaluated on 2000 samples against 5000 held-out:
#   "none" ESS/n 0.076, energy W2 after reweighting 0.25, distance TVD after resampling 0.095;
#          "ot"   ESS/n 0.118, energy W2 after reweighting 0.10, distance TVD after resampling 0.078.
# So "ot": at the same cost per step as "none" it gave 1.5x the ESS and 2.5x smaller energy W2.
# "equivariant" shortens the paths further but triples the step time; it was not trained to
# the end here, and for LJ-13 it is impossible (13! permutations).
CONFIGS: dict[str, ParticleFlowConfig] = {
    "dw4": ParticleFlowConfig("dw4"),
    # LJ-13: the exact divergence needs 36 backward passes per field evaluation; measured CPU
    # per sample and RK4 step with log q, one thread: EGNN 64 x 4 0.064 s (10,000 samples x 20
    # steps: 3.5 CPU-hours), EGNN 32 x 3 0.013 s (0.7 CPU-hours), hence the smaller network
    "lj13": ParticleFlowConfig("lj13", hidden=32, n_layers=3, batch_size=128, n_steps=40_000, eval_batch=500),
}


def config_for(target: str, **overrides: Any) -> ParticleFlowConfig:
    """The config of ``target`` with ``overrides`` (unknown fields raise)."""
    if target not in CONFIGS:
        raise ParticleFlowConfigError(f"unknown target {target!r}; known: {sorted(CONFIGS)}")
    known = {f.name for f in fields(ParticleFlowConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ParticleFlowConfigError(f"unknown config field(s) {bad}; known: {sorted(known)}")
    return replace(CONFIGS[target], **overrides)


# ----------------------------------------------------------------------------------------
# data, model, evaluation
# ----------------------------------------------------------------------------------------


def reference_split(config: ParticleFlowConfig) -> tuple[Tensor, Tensor]:
    """(training ``(n_train, dim)``, held-out ``(n_heldout, dim)``): disjoint parts of one
    seeded permutation of the reference set."""
    total = config.n_train + config.n_heldout
    x = load_reference(config.target, n=total, generator=torch.Generator().manual_seed(config.split_seed))
    return x[:config.n_train], x[config.n_train:]


def _energy(config: ParticleFlowConfig) -> PairPotential:
    energy = get_target(config.target)
    assert isinstance(energy, PairPotential)
    return energy


def build_model(config: ParticleFlowConfig, prior_std: float) -> EquivariantCNF:
    energy = _energy(config)
    return EquivariantCNF(energy.n, energy.d_space, prior_std=prior_std, hidden=config.hidden,
                          n_layers=config.n_layers, time_dim=config.time_dim, max_period=config.max_period,
                          seed=config.seed)


def _min_pair_distance(energy: PairPotential, x: Tensor) -> Tensor:
    return energy.pair_distances(x).min(-1).values.to(torch.float64)


def evaluate_particle_flow(cnf: EquivariantCNF, energy: PairPotential, heldout: Tensor, train: Tensor,
                           n_eval: int, ode_steps: int, seed: int = 0, batch_size: int = 2000,
                           progress: bool = False) -> tuple[dict[str, float], dict[str, Tensor]]:
    r"""Sample ``n_eval`` configurations with log q, reweight, compare with ``heldout``.

    Returns ``(metrics, samples)``. Metrics (W2 values are W2, not W2², in units of kT = 1):

    - ``ess``, ``ess_per_sample``: Kish ESS of log w = -E/kT - log q, and ESS / n;
    - ``log_z``, ``log_z_se``: log Z_U (the partition function on the centre-of-mass-free
      subspace) by importance sampling;
    - ``energy_w2_flow`` (unweighted samples), ``energy_w2_reweighted`` (the weighted sample,
      :func:`boltzlab.metrics.weighted_wasserstein_1d`), ``energy_w2_resampled`` (after
      multinomial resampling of n_eval draws), all against the held-out energies;
    - ``distance_tvd_flow`` / ``distance_tvd_resampled``: interatomic-distance TVD (100 bins);
    - ``*_floor``: the same metric between the training and the held-out reference samples
      (equal sizes), the value a perfect sampler would reach with this many reference samples;
    - the weights' tail: ``max_weight``, ``top1pct_weight`` (the share of the total weight in
      the 1% largest weights), ``log_w_std``;
    - the repulsive core: ``core_fraction``, the fraction of samples whose closest pair is
      closer than the held-out set's 0.1% quantile of the closest-pair distance, and
      ``core_weight``, the share of the weight those samples keep (much less than
      ``core_fraction``: the flow put mass where E is steep and the weights remove it);
    - ``ode_log_q_rms_diff``: RMS change of log q from ``ode_steps`` to twice as many steps (500 samples).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x, log_q = cnf.sample(n_eval, ode_steps, generator=gen, batch_size=batch_size, progress=progress)
    assert log_q is not None
    # float64 energies: a near-overlap in a Lennard-Jones sample overflows d^-12 in float32
    x64 = x.double()
    log_w = sampler_log_weights(energy, x64, log_q)
    n = log_w.numel()
    e_flow = energy.energy(x64)
    e_held = energy.energy(heldout).double()
    e_train = energy.energy(train[:heldout.shape[0]]).double()
    idx = importance_resample(log_w, n, generator=gen)
    ess = kish_ess(log_w)
    log_z, log_z_se = log_z_estimate(log_w)
    w = torch.softmax(log_w, 0)
    k = max(1, n // 100)
    d_min_ref = _min_pair_distance(energy, heldout)
    threshold = float(torch.quantile(d_min_ref, 0.001))
    core = _min_pair_distance(energy, x) < threshold
    nd = (energy.n, energy.d_space)
    conv = ode_convergence(cnf, min(500, n), ode_steps, seed=seed + 1)
    metrics = {
        "n_eval": n,
        "ess": ess,
        "ess_per_sample": ess / n,
        "log_z": log_z,
        "log_z_se": log_z_se,
        "energy_w2_flow": energy_w2(e_flow, e_held),
        "energy_w2_reweighted": weighted_wasserstein_1d(e_flow, log_w, e_held),
        "energy_w2_resampled": energy_w2(e_flow[idx], e_held),
        "energy_w2_floor": energy_w2(e_train, e_held),
        "mean_energy_flow": float(e_flow.mean()),
        "mean_energy_reweighted": float((w * e_flow).sum()),
        "mean_energy_heldout": float(e_held.mean()),
        "distance_tvd_flow": distance_tvd(x, heldout, *nd),
        "distance_tvd_resampled": distance_tvd(x[idx], heldout, *nd),
        "distance_tvd_floor": distance_tvd(train[:heldout.shape[0]], heldout, *nd),
        "distinct_resampled": int(torch.unique(idx).numel()),
        "max_weight": float(w.max()),
        "top1pct_weight": float(w.sort(descending=True).values[:k].sum()),
        "log_w_std": float(log_w.std()),
        "core_threshold": threshold,
        "core_fraction": float(core.double().mean()),
        "core_weight": float(w[core].sum()),
        "ode_steps": ode_steps,
        "ode_log_q_rms_diff": conv["log_q_rms_diff"],
    }
    return metrics, {"x": x.float(), "log_q": log_q, "log_w": log_w}


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(pm, alpha=1 - decay)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_particle_flow(config: ParticleFlowConfig, out: Path, resume: bool = False, stop_after: int | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Train (or continue) the run in ``out``; evaluate and write metrics.json when ``n_steps``
    are done. Returns the metrics (or ``{"step": s}`` when stopped early by ``stop_after``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT
    cfg_path = out / "config.json"
    train_x, heldout = reference_split(config)
    if resume:
        if not ckpt_path.is_file():
            raise ParticleFlowConfigError(f"nothing to resume: {ckpt_path} does not exist")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        # the evaluation's sizes may change between sittings (they do not touch the training)
        diff = {k: (state["config"].get(k), v) for k, v in asdict(config).items()
                if k not in EVAL_FIELDS and state["config"].get(k) != v}
        if diff:
            raise ParticleFlowConfigError(f"{ckpt_path} was trained with a different config: (saved, asked) {diff}")
        state["config"] = asdict(config)
    else:
        if ckpt_path.exists():
            raise ParticleFlowConfigError(f"{ckpt_path} exists; resume it (--auto-resume) or choose another --out")
        state = None
    prior_std = state["prior_std"] if state is not None else (config.prior_std or float(train_x.pow(2).mean().sqrt()))
    model = build_model(config, prior_std)
    ema = build_model(config, prior_std)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.n_steps, eta_min=config.lr / 20)
    gen = torch.Generator().manual_seed(config.seed)
    step, cpu_time, losses = 0, 0.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        step, cpu_time, losses = state["step"], state["cpu_time_s"], state["losses"]
        cfg_path.write_text(json.dumps({**asdict(config), "prior_std_used": state["prior_std"]}, indent=2) + "\n")
    else:
        cfg_path.write_text(json.dumps({**asdict(config), "prior_std_used": prior_std}, indent=2) + "\n")

    def save() -> None:
        _save_atomic({"config": asdict(config), "prior_std": prior_std, "model": model.state_dict(),
                      "ema": ema.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "generator": gen.get_state(), "step": step, "cpu_time_s": cpu_time, "losses": losses},
                     ckpt_path)

    energy = _energy(config)
    last = config.n_steps if stop_after is None else min(config.n_steps, step + stop_after)
    t_cpu = time.process_time()
    bar = tqdm(total=config.n_steps, initial=step, desc=f"train-flow {config.target}", disable=not progress)
    running = 0.0
    while step < last:
        idx = torch.randint(train_x.shape[0], (config.batch_size,), generator=gen)
        loss = flow_matching_loss(model.field, train_x[idx], energy.n, energy.d_space, prior_std,
                                  config.alignment, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"flow-matching loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        opt.step()
        sched.step()
        _ema_update(ema, model, config.ema_decay)
        step += 1
        running += loss.item()
        if step % 100 == 0:
            losses.append(running / 100)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            running = 0.0
        bar.update(1)
        if step % config.checkpoint_every == 0 or step == last:
            cpu_time += time.process_time() - t_cpu
            t_cpu = time.process_time()
            save()
    bar.close()
    if step < config.n_steps:
        return {"step": step, "cpu_time_s": cpu_time}
    t_eval = time.process_time()
    metrics, samples = evaluate_particle_flow(ema, energy, heldout, train_x, config.n_eval, config.ode_steps,
                                              seed=config.seed + 1, batch_size=config.eval_batch, progress=progress)
    eval_cpu = time.process_time() - t_eval
    result = {"target": config.target, "method": "equivariant flow matching (EGNN CNF), reweighted",
              "steps": step, "train_cpu_time_s": round(cpu_time, 1), "eval_cpu_time_s": round(eval_cpu, 1),
              "torch_threads": torch.get_num_threads(), "prior_std": prior_std,
              "n_train": config.n_train, "n_heldout": config.n_heldout, **metrics,
              "final_loss": losses[-1] if losses else None}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    torch.save(samples, out / "samples.pt")
    return result


def load_particle_flow(directory: Path | str) -> tuple[EquivariantCNF, ParticleFlowConfig, dict[str, Any]]:
    """The EMA model of a finished or running run directory, its config and its metrics
    (empty when metrics.json is absent). The model is in eval mode, on the CPU."""
    directory = Path(directory)
    state = torch.load(directory / CHECKPOINT, map_location="cpu", weights_only=False)
    config = ParticleFlowConfig(**state["config"])
    model = build_model(config, state["prior_std"])
    model.load_state_dict(state["ema"])
    metrics_path = directory / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return model.eval(), config, metrics


def shipped_particle_flow(target: str) -> Path:
    """The directory of the run shipped for ``target``: ``boltzlab/data/checkpoints/flow_TARGET``."""
    if target not in TARGETS:
        raise ParticleFlowConfigError(f"target must be one of {TARGETS}, got {target!r}")
    path = SHIPPED_DIR / f"flow_{target}"
    if not (path / CHECKPOINT).is_file():
        raise FileNotFoundError(f"no shipped particle flow for {target!r} at {path}; train one with "
                                f"`python -m boltzlab train-flow {target} --out DIR`")
    return path


# ----------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m boltzlab train-flow TARGET --out DIR [--auto-resume] [--seed S] [--set F=V] [--stop-after N]``."""
    parser = argparse.ArgumentParser(prog="python -m boltzlab train-flow",
                                     description="Train the equivariant flow-matching Boltzmann generator.")
    parser.add_argument("target", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue DIR/checkpoint.pt")
    parser.add_argument("--auto-resume", action="store_true", help="continue DIR's run if it has a checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="training steps to run in this call")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        overrides = dict(parse_field_override(s, ParticleFlowConfigError) for s in args.set)
        if args.seed is not None:
            overrides["seed"] = args.seed
        config = config_for(args.target, **overrides)
        resume = args.resume or (args.auto_resume and (args.out / CHECKPOINT).is_file())
        result = train_particle_flow(config, args.out, resume=resume, stop_after=args.stop_after,
                                     progress=not args.no_progress)
    except ParticleFlowConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
