"""What matters in iDEM, measured: one-factor ablations of a base config at a fixed CPU budget,
sweeps of the sampler (SDE steps, diffusion scale) on one trained checkpoint, and where in
noise level a checkpoint's score goes wrong (:func:`denoise_from_reference`).

Each variant changes one thing in which the course's CPU recipe departs from the public iDEM
code's config (:data:`~boltzlab.training.idem_config.PAPER_CONFIGS`): the target's form, the
clip norm, K, the network's width and depth, regression steps per refill, SDE steps, the noise
range, the sampler's diffusion scale, the loss weight, the batch, the optimiser's clipping and
EMA. Every variant trains for the same CPU time (process time, so a loaded machine does not
penalise one variant more than another) and is evaluated on the same number of fresh samples.
The records are what chapter 06 plots; the command that writes them is

    python -m boltzlab ablate lj13 --out runs/ablation_lj13 --cpu-minutes 15

and it resumes: a finished variant is kept, an interrupted one continues within its budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from boltzlab.training.checkpoints import (
    TrainedSampler,
    _load_payload,
    _sampler_from_payload,
)
from boltzlab.training.idem import (
    CHECKPOINT,
    CONFIGS,
    IDEMConfig,
    TrainingConfigError,
    evaluate_samples,
    evaluation_reference,
    train_idem,
)

# The course's LJ-13 config (the shipped checkpoint's): every variant departs from it; its runs
# stop on their CPU budget, not on n_outer, and are evaluated once at the end.
ABLATION_BASE: dict[str, IDEMConfig] = {
    "lj13": replace(CONFIGS["lj13"], n_outer=10_000, eval_every=10_000),
}

# name -> (what it changes, overrides of the base)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "base": ("the base recipe", {}),
    "blended": ("target: force + noise form (the course's earlier default)", {"estimator": "blended"}),
    "clip150": ("clip norm 150 instead of the paper's 20", {"max_norm": 150.0}),
    "k128": ("K = 128 copies instead of 1000", {"n_mc": 128}),
    "egnn32x3": ("EGNN 32 wide, 3 layers (the first CPU recipe's size)", {"hidden": 32, "n_layers": 3}),
    "egnn128x5": ("EGNN 128 wide, 5 layers (the paper's size)", {"hidden": 128, "n_layers": 5}),
    "inner100": ("100 regression steps per refill (the paper's) instead of 50", {"inner_steps": 100}),
    "sde1000": ("1000 SDE steps per refill (the paper's) instead of 100", {"sde_steps": 1000}),
    "sigma3": ("sigma_max 3 instead of 2", {"sigma_max": 3.0}),
    "diffusion0.9": ("the paper's diffusion_scale 0.9 in every sampler run", {"diffusion_scale": 0.9}),
    "scaled_loss": ("lambda = sigma_t^2 + local_scale^2 (ScaledScore's) instead of 1", {"loss_weight": "scaled"}),
    "batch512": ("batch 512 (the paper's) instead of 128", {"batch_size": 512}),
    "paper_optim": ("the paper's gradient clip 0.5 and no EMA", {"grad_clip": 0.5, "ema_decay": 0.0}),
    # not in the paper: the clip loosened below sigma = 0.3 (IDEMConfig.clip_sigma)
    "clip_sigma0.3": ("clip norm 20 * 0.3 / sigma_t below sigma_t = 0.3 (not the paper's)", {"clip_sigma": 0.3}),
    # not a departure from the paper: the same recipe with another seed, so that a variant's
    # difference from the base can be read against the run-to-run spread
    "base_seed1": ("the base recipe with seed 1 (run-to-run spread)", {"seed": 1}),
}


def variant_config(target: str, name: str) -> IDEMConfig:
    """The config of ablation variant ``name`` of ``target`` (:data:`VARIANTS`)."""
    if target not in ABLATION_BASE:
        raise TrainingConfigError(f"no ablation base for {target!r}; known: {', '.join(ABLATION_BASE)}")
    if name not in VARIANTS:
        raise TrainingConfigError(f"unknown ablation variant {name!r}; known: {', '.join(VARIANTS)}")
    return replace(ABLATION_BASE[target], **VARIANTS[name][1])


def evaluate_checkpoint(path: Path, n: int, seed: int = 0, sde_steps: int | None = None,
                        diffusion_scale: float | None = None, whole_reference: bool = False) -> dict[str, float]:
    """The metrics of :func:`~boltzlab.training.idem.evaluate_samples` on ``n`` fresh samples of
    the checkpoint in ``path`` (its EMA weights), optionally with another sampler: ``sde_steps``
    and ``diffusion_scale`` override the config's. Reference and sampler draws are seeded; the
    reference is a draw of ``n`` samples, or with ``whole_reference`` the whole set, as a final
    evaluation uses (then several seeds measure the spread of a final evaluation's metrics)."""
    payload = _load_payload(path)
    sampler = _sampler_from_payload(payload)
    if diffusion_scale is not None:
        sampler = replace(sampler, config=replace(sampler.config, diffusion_scale=diffusion_scale))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = sampler.sample(n, generator, sde_steps=sde_steps)
    reference = evaluation_reference(sampler.config.target, None if whole_reference else n,
                                     torch.Generator().manual_seed(seed + 7))
    return evaluate_samples(sampler.energy, x, reference, torch.Generator().manual_seed(seed + 8))


def run_variant(target: str, name: str, out_dir: Path, cpu_seconds: float, n_eval: int,
                progress: bool = True) -> dict[str, Any]:
    """Train variant ``name`` into ``out_dir/name`` until it has spent ``cpu_seconds`` of process
    CPU time (the checkpoint's ``cpu_time``, summed over interrupted calls), then evaluate it on
    ``n_eval`` fresh samples.
    Returns the record (also written to ``out_dir/name/ablation.json``)."""
    config = variant_config(target, name)
    run_dir = out_dir / name
    record_path = run_dir / "ablation.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("cpu_budget_s") == cpu_seconds and record.get("n_eval") == n_eval:
            return record
    # the CPU time is the checkpoint's own count, so a variant killed mid-run resumes with what is left
    resume = (run_dir / CHECKPOINT).is_file()
    spent = _load_payload(run_dir).get("cpu_time", 0.0) if resume else 0.0
    if spent < cpu_seconds:
        train_idem(config, run_dir, resume=resume, progress=progress, cpu_budget_s=cpu_seconds - spent)
    payload = _load_payload(run_dir)
    record = {
        "variant": name, "changes": VARIANTS[name][0], "overrides": VARIANTS[name][1],
        "cpu_budget_s": cpu_seconds, "cpu_s": round(payload.get("cpu_time", 0.0), 1), "n_eval": n_eval,
        "outer_iterations": payload["outer"], "regression_steps": payload["outer"] * config.inner_steps,
        "energy_evaluations": payload["energy_evaluations"],
        **evaluate_checkpoint(run_dir, n_eval, seed=config.seed),
        "config": asdict(config),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _claim(run_dir: Path) -> Path | None:
    """Mark ``run_dir`` as being trained by this process (``run_dir/.running`` holds the pid), so
    that processes sharing one variant list never train the same variant at once. Returns the
    lock file, or None when a live process holds it (a stale lock is taken over)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".running"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return None  # held by a live process
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
            except PermissionError:
                return None  # a live process of another user
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    return None


def run_ablation(target: str, out_dir: str | Path, cpu_minutes: float, n_eval: int = 2000,
                 names: list[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Every variant (or ``names``) of ``target`` at ``cpu_minutes`` of CPU each; the records
    of every variant finished in ``out_dir`` (by this call or another) are collected in
    ``out_dir/ablation.json`` after each variant, so an interrupted run keeps what it finished.
    Several processes may share ``out_dir`` and even one list: a variant that another live
    process is training is skipped (see :func:`_claim`). Returns this call's records."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names or list(VARIANTS):
        lock = _claim(out / name)
        if lock is None:  # another live process is training this variant: leave it to that one
            continue
        try:
            records.append(run_variant(target, name, out, 60.0 * cpu_minutes, n_eval, progress=progress))
        finally:
            lock.unlink(missing_ok=True)
        # every finished variant in out_dir, so that two processes splitting the variants with
        # --only leave one complete table
        (out / "ablation.json").write_text(json.dumps(collect_ablation(out), indent=2) + "\n")
    return records


def sampler_sweep(path: str | Path, n: int, sde_steps: list[int], diffusion_scales: list[float],
                  seed: int = 0) -> list[dict[str, float]]:
    """Metrics of one checkpoint for every pair of ``sde_steps`` and ``diffusion_scales``: the
    sampler's axes of the ablation, which need no retraining."""
    rows = []
    for steps in sde_steps:
        for scale in diffusion_scales:
            rows.append({"sde_steps": float(steps), "diffusion_scale": scale,
                         **evaluate_checkpoint(Path(path), n, seed, sde_steps=steps, diffusion_scale=scale)})
    return rows


def denoise_from_reference(path: str | Path | TrainedSampler, sigmas: list[float], n: int,
                           steps_per_unit: int | None = None, seed: int = 0, compile: bool = False,
                           progress: bool = False) -> list[dict[str, float]]:
    """Where in noise level a checkpoint's score goes wrong, measured without energy evaluations.

    ``n`` configurations of the reference set are noised to each ``sigmas`` level and brought
    back to t = 0 by the checkpoint's own sampler (its reverse SDE, diffusion scale and
    negative-time steps included; :func:`~boltzlab.diffusion.reverse_sde_from_data`), in about
    ``steps_per_unit`` steps per unit of t (default: the checkpoint's ``sde_steps``, its
    sampler's step size). With the exact score every row would match the
    reference, so a row's error is made by the network on sigma_t <= its level alone. Two more
    rows bracket them: the configurations themselves ("reference": the metrics' floor at ``n``
    samples) and the sampler from the prior ("prior": t = 1 with ``steps_per_unit`` steps).
    Metrics are :func:`~boltzlab.training.idem.evaluate_samples` against the whole reference
    set; every row uses the same ``n`` configurations and ``seed``. ``path``: a checkpoint
    directory or a loaded :class:`~boltzlab.training.checkpoints.TrainedSampler`. Returns one
    dict per row.
    """
    from boltzlab.diffusion import reverse_sde_from_data
    from boltzlab.training.compiled import CompiledForward
    from boltzlab.training.sampler import (
        _projection,
        model_score,
        negative_time,
        sample_model,
    )

    sampler = path if isinstance(path, TrainedSampler) else _sampler_from_payload(_load_payload(Path(path)))
    config, energy = sampler.config, sampler.energy
    steps_per_unit = config.sde_steps if steps_per_unit is None else steps_per_unit
    reference = evaluation_reference(config.target, None)
    if not 2 <= n <= reference.shape[0]:
        raise TrainingConfigError(f"n must be between 2 and the reference set's {reference.shape[0]}, got {n}")
    generator = torch.Generator().manual_seed(seed)
    x0 = reference[torch.randperm(reference.shape[0], generator=generator)[:n]]
    forward = CompiledForward(sampler.model) if compile else None
    score = model_score(sampler.model, config, energy, forward)  # the sampler's own (chunked; NEM-aware)

    def row(label: str, sigma: float, t: float, steps: int, x: torch.Tensor) -> dict[str, float]:
        metrics = evaluate_samples(energy, x, reference, torch.Generator().manual_seed(seed + 8))
        return {"start": label, "sigma_start": sigma, "t_start": t, "sde_steps": float(steps), **metrics}

    rows = [row("reference", 0.0, 0.0, 0, x0)]
    with torch.no_grad():
        for sigma in tqdm(sorted(sigmas), desc="noise levels", disable=not progress):
            t = float(config.schedule.time_at_std(torch.tensor(float(sigma), dtype=torch.float64)))
            steps = max(1, math.ceil(t * steps_per_unit))
            x = reverse_sde_from_data(score, config.schedule, x0, sigma, steps, project=_projection(energy),
                                      generator=torch.Generator().manual_seed(seed + 1),
                                      increment=config.sde_increment, diffusion_scale=config.diffusion_scale)
            rows.append(row("data", sigma, t, steps, negative_time(config, energy, x)))
        x = sample_model(sampler.model, config, energy, n, torch.Generator().manual_seed(seed + 1), steps_per_unit,
                         forward=forward)
        rows.append(row("prior", config.schedule.prior_std, 1.0, steps_per_unit, x))
    return rows


RECORDS_DIR = Path(__file__).resolve().parents[1] / "data" / "records"


def collect_ablation(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of every finished variant in ``out_dir`` (``out_dir/NAME/ablation.json``), in
    the order of :data:`VARIANTS`."""
    out = Path(out_dir)
    return [json.loads((out / v / "ablation.json").read_text()) for v in VARIANTS if (out / v / "ablation.json").is_file()]


def sampling_spread(out_dir: str | Path, seeds: tuple[int, ...] = (1, 2), variant: str = "base") -> list[dict[str, Any]]:
    """The metrics of ``variant``'s checkpoint re-evaluated on fresh samples drawn with each of
    ``seeds`` (same number of samples as its record): how much a metric moves from one draw
    of samples to the next, with the network fixed. Written to ``out_dir/VARIANT/resampled.json``."""
    run_dir = Path(out_dir) / variant
    record = json.loads((run_dir / "ablation.json").read_text())
    rows = [{"seed": seed, **evaluate_checkpoint(run_dir, record["n_eval"], seed=seed)} for seed in seeds]
    (run_dir / "resampled.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def save_ablation_record(out_dir: str | Path, target: str, records_dir: Path = RECORDS_DIR) -> Path:
    """Write the finished variants of ``out_dir`` to ``records_dir/ablation_TARGET.json`` (what
    chapter 06 reads), after checking that they share one CPU budget and one evaluation size;
    with them the base's re-evaluations (:func:`sampling_spread`) when they exist."""
    records = collect_ablation(out_dir)
    if not records:
        raise TrainingConfigError(f"{out_dir} holds no finished ablation variant")
    budgets = {(r["cpu_budget_s"], r["n_eval"]) for r in records}
    if len(budgets) != 1:
        raise TrainingConfigError(f"{out_dir}: variants ran with different budgets or evaluation sizes {sorted(budgets)}")
    records_dir.mkdir(parents=True, exist_ok=True)
    path = records_dir / f"ablation_{target}.json"
    spread_path = Path(out_dir) / "base" / "resampled.json"
    resampled = json.loads(spread_path.read_text()) if spread_path.is_file() else []
    path.write_text(json.dumps({"target": target, "variants": records, "base_resampled": resampled}, indent=1) + "\n")
    return path


def _saved_ablation(target: str, records_dir: Path) -> dict[str, Any]:
    path = records_dir / f"ablation_{target}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no saved ablation for {target!r} at {path}; run `python -m boltzlab ablate "
                                f"{target} --out DIR` and then `--publish DIR`")
    return json.loads(path.read_text())


def load_ablation_record(target: str, records_dir: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """The saved ablation of ``target`` (:func:`save_ablation_record`): one record per variant."""
    return _saved_ablation(target, records_dir)["variants"]


def load_base_resampled(target: str, records_dir: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """The base checkpoint's re-evaluations saved with the ablation of ``target`` (may be empty)."""
    return _saved_ablation(target, records_dir).get("base_resampled", [])


def scaling_record(run_dir: str | Path, name: str) -> dict[str, Any]:
    """The logged evaluations of the training run in ``run_dir`` as a scaling curve: each with
    ``regression_steps`` (outer iterations x inner steps) beside the energy evaluations spent,
    plus the run's config, how far it got and its earlier phases (a warm-started run's,
    :func:`~boltzlab.training.idem.warm_start_state`). ``name`` labels the curve."""
    run = Path(run_dir)
    summary = json.loads((run / "metrics.json").read_text())
    config = IDEMConfig(**json.loads((run / "config.json").read_text()))
    # (last outer iteration, inner steps) of each phase, the current config's phase last
    spans = [(p["until_outer"], p["config"]["inner_steps"]) for p in summary.get("phases", [])]
    spans.append((math.inf, config.inner_steps))

    def steps(outer: float) -> float:
        done, start = 0.0, 0.0
        for until, inner in spans:
            done += (min(outer, until) - start) * inner
            if outer <= until:
                return done
            start = until
        return done

    evaluations = [{**e, "regression_steps": steps(e["outer"])} for e in summary["evaluations"]]
    if not evaluations:
        raise TrainingConfigError(f"{run} has no logged evaluations yet")
    return {"name": name, "target": config.target, "config": asdict(config), "evaluations": evaluations,
            "outer_iterations": summary["outer_iterations"], "energy_evaluations": summary["energy_evaluations"],
            "phases": summary.get("phases", [])}


def save_scaling_record(run_dir: str | Path, name: str, records_dir: Path = RECORDS_DIR) -> Path:
    """Write :func:`scaling_record` of ``run_dir`` to ``records_dir/scaling_NAME.json``."""
    records_dir.mkdir(parents=True, exist_ok=True)
    path = records_dir / f"scaling_{name}.json"
    path.write_text(json.dumps(scaling_record(run_dir, name), indent=1) + "\n")
    return path


def load_scaling_records(target: str, records_dir: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """The saved scaling curves of ``target`` (:func:`save_scaling_record`), sorted by name."""
    records = [json.loads(p.read_text()) for p in sorted(records_dir.glob("scaling_*.json"))]
    return [r for r in records if r["target"] == target]


def load_from_data_record(name: str, records_dir: Path = RECORDS_DIR) -> dict[str, Any]:
    """The saved :func:`denoise_from_reference` rows of the checkpoint directory ``name`` (a
    shipped checkpoint's name, e.g. ``"lj13"`` or ``"lj55_phase2"``), made by ``python -m
    boltzlab ablate TARGET --from-data CHECKPOINT`` (the record is named after CHECKPOINT's folder)."""
    path = records_dir / f"from_data_{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no from-data record for {name!r} at {path}; run `python -m boltzlab ablate "
                                f"TARGET --from-data boltzlab/data/checkpoints/{name}`")
    return json.loads(path.read_text())


def _write_record(kind: str, checkpoint: Path, record: dict[str, Any]) -> Path:
    """Save ``record`` (with its checkpoint's path) as boltzlab/data/records/KIND_NAME.json, NAME
    being the checkpoint's folder, so that a target's several checkpoints keep their own records
    (what :func:`load_from_data_record` and :func:`boltzlab.training.target_bias.load_record` read)."""
    RECORDS_DIR.mkdir(parents=True, exist_ok=True)
    path = RECORDS_DIR / f"{kind}_{checkpoint.resolve().name}.json"
    path.write_text(json.dumps({**record, "checkpoint": str(checkpoint)}, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boltzlab ablate", description=__doc__.split("\n\n")[0])
    # any target's run can be recorded as a scaling curve (--record); the ablation itself has a base for LJ-13
    parser.add_argument("target", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, help="one run directory per variant goes here (not needed with --publish or --spread)")
    parser.add_argument("--cpu-minutes", type=float, default=15.0, help="CPU budget of every variant")
    parser.add_argument("--n-eval", type=int, default=2000, help="fresh samples each variant is evaluated on")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these variants")
    parser.add_argument("--sweep", type=Path, help="instead: sweep SDE steps and diffusion scale on this checkpoint")
    parser.add_argument("--record", type=Path, metavar="RUN_DIR",
                        help="instead: save RUN_DIR's logged evaluations as the scaling curve named by --out's "
                             "last part, in boltzlab/data/records/")
    parser.add_argument("--publish", type=Path, metavar="ABLATION_DIR",
                        help="instead: save the finished variants in ABLATION_DIR as "
                             "boltzlab/data/records/ablation_TARGET.json")
    parser.add_argument("--spread", type=Path, metavar="ABLATION_DIR",
                        help="instead: re-evaluate ABLATION_DIR's base checkpoint on fresh samples with seeds "
                             "1 and 2 (the metrics' sampling noise), saved beside it for --publish")
    parser.add_argument("--from-data", type=Path, metavar="CHECKPOINT",
                        help="instead: noise reference configurations to each of --sigmas and run CHECKPOINT's "
                             "sampler back to t = 0 (where in noise level its score goes wrong), saved as "
                             "boltzlab/data/records/from_data_NAME.json, NAME being CHECKPOINT's folder")
    parser.add_argument("--target-virial", type=Path, metavar="CHECKPOINT",
                        help="instead: the virial identity per noise level for CHECKPOINT's network and its "
                             "Monte Carlo training target at K = 1000, 4000, 32000 (boltzlab.training.target_bias), "
                             "saved as boltzlab/data/records/target_virial_NAME.json")
    parser.add_argument("--dsm-ceiling", type=Path, metavar="CHECKPOINT",
                        help="instead: train CHECKPOINT's network by denoising score matching on half the "
                             "reference set and evaluate its sampler on the other half, saved as "
                             "boltzlab/data/records/dsm_ceiling_NAME.json")
    parser.add_argument("--mc-target-ceiling", type=Path, metavar="CHECKPOINT",
                        help="instead: as --dsm-ceiling, but regressing onto iDEM's Monte Carlo target at the "
                             "same noised reference configurations, saved as mc_target_ceiling_NAME.json")
    parser.add_argument("--dsm-steps", type=int, default=5000,
                        help="regression steps for --dsm-ceiling and --mc-target-ceiling")
    parser.add_argument("--n-points", type=int, default=200, help="noised reference points for --target-virial")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.03, 0.1, 0.2, 0.3, 0.5, 1.0],
                        help="noise levels for --from-data and --target-virial")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile the network for --from-data (float32 rounding only)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the budget is process CPU time, and two "
                             "processes splitting the variants with --only should not compete)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    if args.cpu_minutes <= 0 or args.n_eval < 2:
        parser.error("--cpu-minutes must be positive and --n-eval at least 2")
    if args.publish is not None:
        print(save_ablation_record(args.publish, args.target))
        return 0
    def checked_sampler(checkpoint: Path) -> TrainedSampler:
        sampler = _sampler_from_payload(_load_payload(checkpoint))
        if sampler.config.target != args.target:
            parser.error(f"{checkpoint} is a {sampler.config.target} checkpoint, not {args.target}")
        return sampler

    if args.from_data is not None:
        sampler = checked_sampler(args.from_data)
        rows = denoise_from_reference(sampler, args.sigmas, args.n_eval, compile=args.compile,
                                      progress=not args.no_progress)
        for r in rows:
            print(json.dumps(r))
        print(_write_record("from_data", args.from_data, {"target": args.target, "n": args.n_eval,
                                                          "sigmas": sorted(args.sigmas), "seed": 0, "rows": rows}))
        return 0
    for flag in ("target_virial", "dsm_ceiling", "mc_target_ceiling"):
        checkpoint = getattr(args, flag)
        if checkpoint is None:
            continue
        from boltzlab.training import target_bias
        sampler = checked_sampler(checkpoint)
        if flag == "target_virial":
            record = target_bias.target_virial_record(sampler, sorted(args.sigmas), args.n_points)
            for r in record["rows"]:
                print(json.dumps(r))
        else:
            if args.dsm_steps < 1:
                parser.error("--dsm-steps must be at least 1")
            record, _ = target_bias.data_ceiling(sampler, args.dsm_steps, args.n_eval, progress=not args.no_progress,
                                                 regression="dsm" if flag == "dsm_ceiling" else "mc_target")
            print(json.dumps(record["metrics"]))
        print(_write_record(flag, checkpoint, record))
        return 0
    if args.spread is not None:
        for row in sampling_spread(args.spread):
            print(json.dumps(row))
        return 0
    if args.out is None:
        parser.error("--out is required (except with --publish or --spread)")
    if args.record is not None:
        print(save_scaling_record(args.record, args.out.name))
        return 0
    if args.target not in ABLATION_BASE:
        parser.error(f"no ablation base for {args.target!r} (only --record works for it); known: "
                     f"{', '.join(sorted(ABLATION_BASE))}")
    if args.sweep is not None:
        rows = sampler_sweep(args.sweep, args.n_eval, [25, 50, 100, 200, 400], [0.8, 0.9, 1.0])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sampler_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
        for row in rows:
            print(json.dumps(row))
        return 0
    for record in run_ablation(args.target, args.out, args.cpu_minutes, args.n_eval, args.only,
                               progress=not args.no_progress):
        print(json.dumps({k: v for k, v in record.items() if k != "config"}))
    return 0
