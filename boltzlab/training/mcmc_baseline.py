"""The honest baseline of chapter 06: MCMC given the same number of target-energy
evaluations as a trained iDEM sampler, saved beside its checkpoint, and the command that trains
a run to completion and then runs it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from boltzlab import metrics
from boltzlab.diffusion import sample_prior
from boltzlab.energies import Energy, get_target
from boltzlab.estimators import clip_for
from boltzlab.training.checkpoints import _load_payload, _sampler_from_payload
from boltzlab.training.idem import (
    CHECKPOINT,
    IDEMConfig,
    TrainingConfigError,
    evaluate_samples,
    evaluation_reference,
    train_idem,
)
from boltzlab.training.idem_config import SHIPPED_PHASES, config_for
from boltzlab.training.parallel import rank_and_world
from boltzlab.training.sampler import _projection

# ----------------------------------------------------------------------------------------


def annealed_start(energy: Energy, x0: Tensor, n_steps: int, *, kT_start: float = 10.0, step: float = 1e-3,
                   max_norm: float = 20.0, generator: torch.Generator | None = None) -> Tensor:
    r"""A short annealed warm-up that frees chains started from the prior: ``n_steps`` steps of
    overdamped Langevin dynamics with per-particle clipped forces,

        x <- x + tau clip(F(x), c) / kT_k + sqrt(2 tau) z,   kT_k = kT_start (kT / kT_start)^(k / (n - 1)),

    cooling geometrically from ``kT_start`` to the target's kT (tau = ``step``, c = ``max_norm``).
    A prior draw of a particle system often has a pair far inside the repulsive core
    (energies of 1e6 to 1e12): MALA's proposals from there overshoot and are all rejected, so
    such a chain never moves. The clip bounds every particle's move by tau c / kT_k, and the
    heat early on lets the cluster rearrange before it settles. No Metropolis test, so the
    warm-up is not itself a sampler; MALA at kT follows (:func:`equal_budget_mcmc`).
    Each step costs one energy-and-force evaluation per chain. (n, dim) -> (n, dim).
    """
    if n_steps < 1:
        return x0.clone()
    project = _projection(energy)
    ratios = torch.linspace(0.0, 1.0, n_steps, dtype=torch.float64) if n_steps > 1 else torch.ones(1, dtype=torch.float64)
    temperatures = kT_start * (energy.kT / kT_start) ** ratios
    x = x0.clone()
    for kT in temperatures.tolist():
        force = torch.nan_to_num(energy.forces(x), nan=0.0, posinf=0.0, neginf=0.0)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + step * clip_for(energy, force, max_norm) / kT + math.sqrt(2.0 * step) * z
        if project is not None:
            x = project(x)
    return x


def unequilibrated(energies: Tensor, reference_energies: Tensor) -> Tensor:
    """Chains whose final energy lies above every reference energy: (n,), (m,) -> bool (n,).

    At equilibrium a chain exceeds the largest of m reference energies with probability
    1 / (m + 1); the chains this flags are stuck (an overlapping pair, an uncondensed
    cluster), and they dominate an energy W2, whose squared differences weigh outliers."""
    return ~torch.isfinite(energies) | (energies > reference_energies.max())


# chains a baseline runs at most (:func:`write_baseline`): a larger budget's chains are i.i.d.
# copies of these, so more of them would only sharpen the same metrics
MAX_BASELINE_CHAINS = 4_096

# Fewer measured chains where each costs more: an LJ-55 MALA step of 256 chains took 29-45 ms
# here (22-34 steps/s, with and without another job), so the 2081 chains of the shipped
# checkpoint's budget would take one to two hours; 256 of them took 13 minutes (the metrics of
# 256 configurations, 380,160 distances).
BASELINE_CHAINS: dict[str, int] = {"lj55": 256}


def equal_budget_mcmc(config: IDEMConfig, n_energy_evaluations: int, n_chains: int | None = None,
                      kernel: str = "mala", progress: bool = True, max_steps: int = 20_000,
                      warmup_fraction: float = 0.1, max_chains: int | None = None,
                      whole_reference: bool = False) -> dict[str, float]:
    """Run ``n_chains`` MCMC chains (one energy-and-force evaluation per chain and step) for
    ``n_energy_evaluations // n_chains`` steps and evaluate their final states like a sampler.

    The chains start where iDEM's reverse SDE starts, from the prior N(0, sigma_1^2 I)
    (centre-of-mass free), so both methods get the same information: the energy, its
    forces, and the same number of evaluations. The first ``warmup_fraction`` of each chain's
    steps is :func:`annealed_start` (inside the budget), so that no chain is left stuck where
    a short warm-up frees it; of the remaining MALA steps the first half adapts the step size.
    The final state of every chain is one sample (``n_chains`` defaults to ``config.n_eval``,
    the number of samples iDEM is evaluated on, or more when that would need more than
    ``max_steps`` steps per chain).

    ``max_chains``: run at most this many of the budget's chains. Every chain takes the same
    number of steps from an independent prior draw, so the budget's chains are i.i.d. and any
    subset of them is a sample of the same final-state distribution: its metrics estimate the
    full run's with more sampling noise and no other change (W2's finite-sample bias, if
    anything, counts against MCMC). ``whole_reference``: measure against the whole reference
    set, as a final evaluation does (else a draw of ``config.n_eval``).

    Returns the metrics of :func:`evaluate_samples` on the chains run, plus ``"steps"``,
    ``"warmup_steps"``, ``"n_chains"`` (the budget's), ``"chains_run"``,
    ``"energy_evaluations"`` (the budget's chains times their steps), ``"acceptance"``,
    ``"wall_time_s"``, ``"unequilibrated_fraction"`` (:func:`unequilibrated`) and
    ``"energy_w2_equilibrated"``, the energy W2 of the other chains.
    """
    from boltzlab.mcmc import run_mcmc

    if not 0.0 <= warmup_fraction < 1.0:
        raise TrainingConfigError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    energy = get_target(config.target)
    # more chains rather than more steps once chains are long enough to equilibrate locally:
    # the same evaluations, better vectorised (and every extra chain is another sample)
    n_chains = n_chains or max(config.n_eval, -(-n_energy_evaluations // max_steps))
    n_steps = n_energy_evaluations // n_chains
    n_warmup = int(warmup_fraction * n_steps)
    n_mala = n_steps - n_warmup
    if n_mala < 2:
        raise TrainingConfigError(f"a budget of {n_energy_evaluations} evaluations gives {n_chains} chains "
                                  f"fewer than 2 MALA steps each")
    if max_chains is not None and max_chains < 1:
        raise TrainingConfigError(f"max_chains must be a positive int or None, got {max_chains}")
    chains_run = n_chains if max_chains is None else min(n_chains, max_chains)
    generator = torch.Generator().manual_seed(config.seed + 99)
    x0 = sample_prior(config.schedule, chains_run, energy.dim, project=_projection(energy), generator=generator)
    start = time.perf_counter()
    x0 = annealed_start(energy, x0.double(), n_warmup, max_norm=config.max_norm or 20.0, generator=generator)
    warmup_time = time.perf_counter() - start
    # a step size of the order of the smallest length scale; adaptation takes it from there
    result = run_mcmc(energy, x0, n_mala, kernel=kernel, step_size=1e-3, burn_in=n_mala // 2,
                      thin=n_mala - n_mala // 2, generator=generator, progress=progress, keep_energy_trace=False)
    x = result.samples[-1].float()
    reference = evaluation_reference(config.target, None if whole_reference else config.n_eval,
                                     torch.Generator().manual_seed(config.seed + 7))
    stuck = unequilibrated(energy.energy(x), energy.energy(reference))
    kept = x[~stuck]
    spent_per_chain = (result.n_energy_evaluations + n_warmup * chains_run) / chains_run
    return {"steps": float(n_steps), "warmup_steps": float(n_warmup), "n_chains": float(n_chains),
            "chains_run": float(chains_run), "reference_samples": float(reference.shape[0]),
            "energy_evaluations": float(round(spent_per_chain * n_chains)),
            "acceptance": float(result.acceptance.mean()), "wall_time_s": round(result.wall_time + warmup_time, 1),
            **evaluate_samples(energy, x, reference, torch.Generator().manual_seed(config.seed + 8)),
            "unequilibrated_fraction": float(stuck.float().mean()),
            "energy_w2_equilibrated": (metrics.energy_w2(energy.energy(kept), energy.energy(reference))
                                       if len(kept) else math.nan)}


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
    max_chains = BASELINE_CHAINS.get(config.target, MAX_BASELINE_CHAINS)
    result = {**equal_budget_mcmc(config, budget, progress=progress, max_chains=max_chains,
                                  whole_reference=True), "budget": float(budget)}
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
    if baseline and rank_and_world()[0] == 0:
        current_baseline(out, state.energy_evaluations, progress=progress)
    return out


def train_shipped(target: str, out_dir: str | Path, *, baseline: bool = True, progress: bool = True,
                  phases: list[tuple[dict[str, Any], int]] | None = None) -> Path:
    """Retrain ``target`` the way its shipped checkpoint was trained, into ``out_dir``: one
    :func:`train_to_completion` of ``CONFIGS[target]``, or, for a target in
    :data:`~boltzlab.training.idem_config.SHIPPED_PHASES` (or given ``phases``), each phase in
    turn, the earlier ones in ``out_dir/phase1``, ... and the last in ``out_dir`` itself, each
    started from the one before (``init_from``) and stopped at its outer iteration. Every phase
    continues a run found in its directory, so calling this again after an interruption picks
    up where it stopped. Then the equal-budget MCMC baseline, as in :func:`train_to_completion`."""
    phases = SHIPPED_PHASES.get(target) if phases is None else phases
    out = Path(out_dir)
    if not phases:
        return train_to_completion(config_for(target), out, baseline=baseline, progress=progress)
    previous: Path | None = None
    previous_until = 0  # where the previous phase ended: a new phase starts there
    state = None
    for k, (overrides, until) in enumerate(phases):
        config = config_for(target, **overrides)
        # a phase may run past the recipe's planned length (DW-4's second phase: to 1000 of 100)
        config = replace(config, n_outer=max(config.n_outer, until))
        run = out if k == len(phases) - 1 else out / f"phase{k + 1}"
        resume = (run / CHECKPOINT).is_file()
        done = _load_payload(run)["outer"] if resume else previous_until
        if until < done:
            raise TrainingConfigError(f"phase {k + 1} of {target} ends at outer iteration {until}, "
                                      f"but its run is already at {done}")
        state = train_idem(config, run, resume=resume, init_from=None if resume else previous,
                           stop_after=until - done, progress=progress)
        previous, previous_until = run, until
    assert state is not None
    if baseline and rank_and_world()[0] == 0:
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
