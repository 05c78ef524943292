"""``python -m boltzlab train TARGET ...``: train, resume, profile or baseline an iDEM, pDEM or NEM run
(see ``python -m boltzlab train --help``)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from boltzlab.training.idem import (
    CHECKPOINT,
    CONFIGS,
    PRESETS,
    CheckpointError,
    IDEMConfig,
    TrainingConfigError,
    config_for,
    train_idem,
)
from boltzlab.training import idem
from boltzlab.training.mcmc_baseline import current_baseline
from boltzlab.training.parallel import rank_and_world
from boltzlab.validation import parse_field_override

# ----------------------------------------------------------------------------------------


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
    code = _train_command(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A rank that reaches the interpreter's shutdown after destroy_process_group sometimes
        # aborts in a destructor of the gloo backend ("terminate called without an active
        # exception": 1 of 12 two-process runs here), with its work done and saved. Leave
        # without that shutdown, once what it printed is flushed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train_command(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m boltzlab train", description=idem.__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(CONFIGS))
    parser.add_argument("--out", type=Path, help="checkpoint directory (required unless --profile)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="course",
                        help="course: the shipped CPU configs; paper: the public iDEM code's sizes")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--auto-resume", action="store_true",
                        help="continue DIR's run if it has a checkpoint, else start one (restartable)")
    parser.add_argument("--init-from", type=Path, metavar="RUN_DIR",
                        help="start a new run (a second phase) from RUN_DIR's checkpoint, trained under another "
                             "config: same network and buffer sizes, anything else may change (e.g. --set clip_sigma=0.1); "
                             "ignored when --auto-resume finds DIR's own checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="outer iterations to run in this call")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set n_outer=200 --set method=nem")
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
    parser.add_argument("--final-samples", type=int, metavar="N",
                        help="after training, evaluate N fresh samples (saved as DIR/samples.pt) as the "
                             "run's final evaluation: how a checkpoint is made ready to ship")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.procs < 1:
        parser.error(f"--procs must be >= 1, got {args.procs}")
    if args.out is None and not args.profile:
        parser.error("--out DIR is required (or use --profile)")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        overrides = dict(parse_field_override(s, TrainingConfigError, IDEMConfig.__dataclass_fields__)
                         for s in args.set)
        if args.seed is not None:
            overrides["seed"] = args.seed
        config = config_for(args.target, args.preset, **overrides)
    except TrainingConfigError as err:
        parser.error(str(err))
    if args.procs > 1 and not distributed:
        # the mistakes every rank would report, said once before any process starts
        if config.batch_size % args.procs:
            parser.error(f"batch_size {config.batch_size} must be divisible by --procs {args.procs}")
        saved = args.out / CHECKPOINT if args.out is not None else None
        if saved is not None and (args.resume or args.auto_resume) and saved.is_file():
            trained_with = torch.load(saved, map_location="cpu", weights_only=False).get("world_size", 1)
            if trained_with != args.procs:
                parser.error(f"{saved} was trained with {trained_with} process(es); resume it with "
                             f"--procs {trained_with}")
        return _launch_processes(args.procs, argv)
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = rank_and_world()[0]
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
                           progress=not args.no_progress, compile=args.compile,
                           init_from=None if resume else args.init_from)
    except (CheckpointError, TrainingConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            dist.destroy_process_group()
    if rank == 0 and args.final_samples is not None:
        state.evaluations.append(idem.final_evaluation(args.out, args.final_samples, progress=not args.no_progress,
                                                       compile=args.compile))
    if rank == 0:
        final = state.evaluations[-1] if state.evaluations else {}
        print(json.dumps({"outer": state.outer, "energy_evaluations": state.energy_evaluations,
                          "wall_time_s": round(state.wall_time, 1), **final}))
        if args.baseline:
            baseline = current_baseline(args.out, state.energy_evaluations, progress=not args.no_progress)
            print(json.dumps({"mcmc_baseline": baseline}))
    return 0
