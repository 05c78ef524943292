"""The honest baseline of chapter 06: MCMC given the same number of target-energy
evaluations as a trained iDEM sampler, saved beside its checkpoint, and the command that trains
a run to completion and then runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from boltzlab.diffusion import sample_prior
from boltzlab.energies import get_target
from boltzlab.training.idem import (
    CHECKPOINT,
    IDEMConfig,
    TrainingConfigError,
    _load_payload,
    _projection,
    _sampler_from_payload,
    evaluate_samples,
    evaluation_reference,
    train_idem,
)
from boltzlab.training.parallel import rank_and_world

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
