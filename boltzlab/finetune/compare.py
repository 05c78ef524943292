r"""Every fine-tuning method on the DW-4 tasks (:mod:`boltzlab.finetune.tasks`), several seeds, as
JSON records: ``python -m boltzlab.finetune.compare --size small --out DIR`` (also
``benchmarks/finetune_compare.py``).

Methods: the pretrained sampler itself; best-of-N (N = 2, 4, 8, 16, from the pretrained pool);
reward-weighted regression (denoising score matching on the pool weighted by exp(r/alpha));
policy gradient with a KL penalty (DDPO/DPOK style, :func:`~boltzlab.finetune.policy.policy_gradient`);
reward backpropagation through the whole sampler and through its last steps only (DRaFT, DRaFT-K;
differentiable reward only); iterative distillation with roll-ins from the pretrained model, the
student, and a half-and-half mixture (VIDD, :func:`~boltzlab.finetune.vidd.iterative_distillation`).

Each record has a ``curve`` of evaluations during fine-tuning (reward, path KL to the pretrained
sampler, objective E[r] - alpha KL, the gap alpha log Z - objective to the importance-sampled
optimum, and the score-network rows and reward evaluations spent so far), the ``final`` one, the
totals spent, and the sampler steps each new sample costs. Best-of-N's KL is the exact KL of its
samples (log N - (N-1)/N for a continuous reward; from the pool's class frequencies for the
piecewise-constant one); the diffusion models' KL is the path KL, an upper bound on theirs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from boltzlab.diffusion import fit_score_model
from boltzlab.finetune.baselines import (
    best_of_n,
    best_of_n_grid_probs,
    best_of_n_kl,
    reward_weights,
)
from boltzlab.finetune.chain import CountingReward, CountingScore, EvaluationCounter
from boltzlab.finetune.measures import grid_kl
from boltzlab.finetune.policy import (
    PolicyGradientConfig,
    RewardBackpropConfig,
    policy_gradient,
    reward_backprop,
)
from boltzlab.finetune.tasks import TASK_NAMES, SamplerTask, dw4_tasks, evaluate_model
from boltzlab.finetune.vidd import DistillationConfig, iterative_distillation
from boltzlab.training import TrainingHistory

METHODS = ("pretrained", "best_of_n", "rwr", "policy_gradient", "draft", "draft_truncated", "vidd_pretrained",
           "vidd_student", "vidd_mixture")


@dataclass(frozen=True)
class CompareSizes:
    """Sizes of one comparison run (see :data:`SIZES`)."""

    n_pool: int
    sde_steps: int
    n_eval: int
    n_curve: int
    seeds: tuple[int, ...]
    bon_ns: tuple[int, ...]
    rwr_steps: int
    rwr_lr: float
    pg_iterations: int
    pg_batch: int
    pg_grad_steps: int
    pg_lr: float
    draft_iterations: int
    draft_batch: int
    draft_lr: float
    draft_truncate: int
    vidd_rounds: int
    vidd_states: int
    vidd_rollouts: int
    vidd_rollout_steps: int
    vidd_steps: int
    vidd_lr: float
    batch_size: int = 128


SIZES = {
    "smoke": CompareSizes(n_pool=400, sde_steps=10, n_eval=100, n_curve=2, seeds=(0,), bon_ns=(2, 4), rwr_steps=4,
                          rwr_lr=1e-4, pg_iterations=2, pg_batch=8, pg_grad_steps=3, pg_lr=1e-4, draft_iterations=2,
                          draft_batch=8, draft_lr=1e-4, draft_truncate=3, vidd_rounds=2, vidd_states=16,
                          vidd_rollouts=2, vidd_rollout_steps=3, vidd_steps=2, vidd_lr=1e-4, batch_size=16),
    # learning rates: of 1e-4 and 1e-3, the one with the smaller final gap in a one-seed trial of each method
    "small": CompareSizes(n_pool=20_000, sde_steps=30, n_eval=2000, n_curve=400, seeds=(0, 1, 2), bon_ns=(2, 4, 8, 16),
                          rwr_steps=300, rwr_lr=1e-4, pg_iterations=150, pg_batch=64, pg_grad_steps=8, pg_lr=1e-4,
                          draft_iterations=80, draft_batch=48, draft_lr=1e-4, draft_truncate=8, vidd_rounds=3,
                          vidd_states=384, vidd_rollouts=8, vidd_rollout_steps=15, vidd_steps=100, vidd_lr=1e-4),
}


def _evaluation(task: SamplerTask, n: int, seed: int) -> Callable[[nn.Module], dict[str, float]]:
    generator = torch.Generator().manual_seed(10_000 + seed)
    return lambda model: evaluate_model(task, model, n, generator)


def _record(task: SamplerTask, method: str, seed: int, curve: list[dict[str, float]], final: dict[str, float],
            counter: EvaluationCounter | None, per_sample_steps: float, wall: float, **settings) -> dict:
    return {"task": task.name, "method": method, "seed": seed, "curve": curve, "final": final,
            "score_rows": float(counter.rows) if counter else 0.0,
            "reward_evals": float(counter.rewards) if counter else 0.0,
            "sampler_steps_per_sample": per_sample_steps, "wall_s": wall, "settings": settings}


def _curve_from_history(history: TrainingHistory) -> list[dict[str, float]]:
    names = list(history.evaluations)
    return [{"iteration": float(step), **{k: history.evaluations[k][i] for k in names}}
            for i, step in enumerate(history.eval_steps)]


def _best_of_n_records(task: SamplerTask, sizes: CompareSizes, seed: int) -> dict:
    """Best-of-N from the pretrained pool: every N a curve point, no fine-tuning."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(task.pool.shape[0], generator=generator)
    pool, r_pool = task.pool[order], task.pool_rewards[order]
    curve = []
    for n in sizes.bon_ns:
        groups = pool.shape[0] // n
        best = best_of_n(pool[: groups * n].reshape(groups, n, -1), r_pool[: groups * n].reshape(groups, n).float())
        r = task.reward(best).double()
        if task.differentiable:  # continuous reward: the KL of best-of-N is the same for every q_pre and r
            kl = best_of_n_kl(n)
        else:  # a discrete reward: the exact best-of-N law over its values, from the pool's frequencies
            values, counts = torch.unique(task.pool_rewards, return_counts=True)
            probs = counts.double() / counts.sum()
            kl = grid_kl(best_of_n_grid_probs(probs, values, n).log(), probs.log())
        objective = float(r.mean()) - task.alpha * kl
        curve.append({"n": float(n), "reward": float(r.mean()), "reward_se": float(r.std() / math.sqrt(groups)),
                      "kl": kl, "objective": objective, "gap": task.optimum.objective - objective,
                      "score_rows": 0.0, "reward_evals": 0.0,
                      "sampler_steps_per_sample": float(n * task.sde_steps)})
    final = max(curve, key=lambda row: row["objective"])
    return _record(task, "best_of_n", seed, curve, final, None, final["sampler_steps_per_sample"], 0.0,
                   ns=list(sizes.bon_ns))


def run_method(task: SamplerTask, method: str, sizes: CompareSizes, seed: int, progress: bool = False) -> dict:
    """Run one method on one task with one seed; returns its record (module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    torch.manual_seed(seed)
    evaluate = _evaluation(task, sizes.n_eval, seed)
    curve_eval = _evaluation(task, sizes.n_curve, seed)
    k = task.sde_steps
    start = time.perf_counter()
    if method == "pretrained":
        final = evaluate(task.pretrained)
        return _record(task, method, seed, [{**final, "score_rows": 0.0, "reward_evals": 0.0}], final, None, k,
                       time.perf_counter() - start)
    if method == "best_of_n":
        return _best_of_n_records(task, sizes, seed)
    if method == "rwr":
        counter = EvaluationCounter()
        counter.rows, counter.rewards = task.pool.shape[0] * k, task.pool.shape[0]  # the pool's sampling
        model = CountingScore(task.fresh_model(), counter)
        weights = reward_weights(task.pool_rewards, task.alpha)
        ess = float(1.0 / weights.pow(2).sum())
        fit_score_model(model, task.pool, task.schedule, sizes.rwr_steps, weights=weights.float(),
                        batch_size=sizes.batch_size, lr=sizes.rwr_lr, project=task.project, seed=seed,
                        progress=progress, desc="reward-weighted regression")
        final = evaluate(model.model)
        curve = [{**curve_eval(task.pretrained), "score_rows": float(task.pool.shape[0] * k),
                  "reward_evals": float(task.pool.shape[0])},
                 {**final, "score_rows": float(counter.rows), "reward_evals": float(counter.rewards)}]
        return _record(task, method, seed, curve, final, counter, k, time.perf_counter() - start, pool_ess=ess,
                       steps=sizes.rwr_steps, lr=sizes.rwr_lr)
    if method == "policy_gradient":
        config = PolicyGradientConfig(n_iterations=sizes.pg_iterations, batch_size=sizes.pg_batch, sde_steps=k,
                                      alpha=task.alpha, lr=sizes.pg_lr, grad_steps=min(sizes.pg_grad_steps, k),
                                      max_grad_norm=1.0)
        run = policy_gradient(task.pretrained, task.reward, task.schedule, task.dim, config, project=task.project,
                              seed=seed, evaluate=curve_eval, eval_every=max(1, config.n_iterations // 3),
                              progress=progress)
        return _record(task, method, seed, _curve_from_history(run.history), evaluate(run.model), run.counter, k,
                       time.perf_counter() - start, **asdict(config))
    if method in ("draft", "draft_truncated"):
        if not task.differentiable:
            raise ValueError(f"{method} needs a differentiable reward; task {task.name!r} has none")
        config = RewardBackpropConfig(n_iterations=sizes.draft_iterations, batch_size=sizes.draft_batch, sde_steps=k,
                                      alpha=task.alpha, lr=sizes.draft_lr, max_grad_norm=1.0,
                                      truncate=min(sizes.draft_truncate, k) if method == "draft_truncated" else None)
        run = reward_backprop(task.pretrained, task.reward, task.schedule, task.dim, config, project=task.project,
                              seed=seed, evaluate=curve_eval, eval_every=max(1, config.n_iterations // 3),
                              progress=progress)
        return _record(task, method, seed, _curve_from_history(run.history), evaluate(run.model), run.counter, k,
                       time.perf_counter() - start, **asdict(config))
    # iterative distillation, by roll-in
    counter = EvaluationCounter()
    wrapped = CountingScore(copy.deepcopy(task.pretrained), counter)
    config = DistillationConfig(n_rounds=sizes.vidd_rounds, collections_per_round=1, n_states=sizes.vidd_states,
                                n_rollouts=sizes.vidd_rollouts, steps_per_collection=sizes.vidd_steps,
                                batch_size=sizes.batch_size, sde_steps=k, rollout_steps=sizes.vidd_rollout_steps,
                                lr=sizes.vidd_lr, rollin=method.removeprefix("vidd_"), alpha_total=task.alpha,
                                moment_matched=False)
    result = iterative_distillation(wrapped, CountingReward(task.reward, counter), task.schedule, task.dim, config,
                                    project=task.project, seed=seed, progress=progress)
    per_round = counter.rows / config.n_rounds, counter.rewards / config.n_rounds
    curve = []
    model: nn.Module = wrapped
    for r_idx, snapshot in enumerate(result.snapshots):
        model = copy.deepcopy(wrapped)
        model.load_state_dict(snapshot)
        curve.append({"round": float(r_idx + 1), "tilt": result.tilts[r_idx], **curve_eval(model.model),
                      "score_rows": per_round[0] * (r_idx + 1), "reward_evals": per_round[1] * (r_idx + 1)})
    final = evaluate(model.model)
    return _record(task, method, seed, curve, final, counter, k, time.perf_counter() - start,
                   **{key: value for key, value in asdict(config).items() if key != "alphas"})


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of each (task, method)'s final numbers."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        groups.setdefault((rec["task"], rec["method"]), []).append(rec)
    rows = []
    for (task, method), recs in groups.items():
        row: dict = {"task": task, "method": method, "seeds": len(recs)}
        for key in ("reward", "kl", "objective", "gap"):
            values = [rec["final"][key] for rec in recs]
            row[key] = statistics.fmean(values)
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("score_rows", "reward_evals", "sampler_steps_per_sample", "wall_s"):
            row[key] = statistics.fmean(rec[key] for rec in recs)
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], tasks: dict[str, SamplerTask]) -> str:
    """A markdown table of :func:`summarize`'s rows, with each task's optimum first."""
    lines = [("| task | method | E[r] | KL(q‖q_pre) | E[r] - αKL | gap to α log Z | score rows | reward evals "
              "| steps/sample | wall s |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, task in tasks.items():
        opt = task.optimum
        lines.append(f"| {name} | optimum (IS from q_pre, ESS {opt.ess:.0f}/{opt.n}) | {opt.reward:.3f} ± "
                     f"{opt.reward_se:.3f} | {opt.kl:.3f} ± {opt.kl_se:.3f} | {opt.objective:.3f} ± "
                     f"{opt.log_z_se * task.alpha:.3f} | 0 | | | | |")
        ref = task.reference
        lines.append(f"| {name} | optimum if q_pre were exact (MCMC set reweighted) | {ref['reward']:.3f} | "
                     f"{ref['kl']:.3f} | {ref['objective']:.3f} | | | | | |")
        for row in rows:
            if row["task"] != name:
                continue
            lines.append(f"| {name} | {row['method']} | {row['reward']:.3f} ± {row['reward_sd']:.3f} | "
                         f"{row['kl']:.3f} ± {row['kl_sd']:.3f} | {row['objective']:.3f} ± {row['objective_sd']:.3f}"
                         f" | {row['gap']:.3f} | {row['score_rows']:.2e} | {row['reward_evals']:.2e} | "
                         f"{row['sampler_steps_per_sample']:.0f} | {row['wall_s']:.0f} |")
    return "\n".join(lines)


def run_comparison(size: str = "small", *, methods: Sequence[str] = METHODS, task_names: Sequence[str] = TASK_NAMES,
                   seeds: Sequence[int] | None = None, out: Path | None = None, progress: bool = True,
                   kT: float = 0.75, pair_scale: float = 0.5) -> dict:
    """Run ``methods`` on the DW-4 ``task_names`` for ``seeds`` at ``size`` (:data:`SIZES`) and, with
    ``out``, write ``records.json`` (everything) and ``table.md``. Returns the JSON payload."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    sizes = SIZES[size]
    seeds = tuple(seeds) if seeds is not None else sizes.seeds
    start = time.perf_counter()
    all_tasks = dw4_tasks(kT=kT, pair_scale=pair_scale, sde_steps=sizes.sde_steps, n_pool=sizes.n_pool, seed=0)
    tasks = {name: all_tasks[name] for name in task_names}
    records = []
    from tqdm.auto import tqdm

    jobs = [(t, m, s) for t in tasks.values() for m in methods for s in seeds
            if task_differentiable_ok(t, m)]
    header = {
        "size": size, "sizes": asdict(sizes), "seeds": list(seeds), "kT": kT, "pair_scale": pair_scale,
        "tasks": {name: {"description": t.description, "alpha": t.alpha, "sde_steps": t.sde_steps,
                         "optimum": t.optimum.as_dict(), "reference": t.reference, **t.extra}
                  for name, t in tasks.items()},
    }
    for task, method, seed in tqdm(jobs, desc="finetune-compare", disable=not progress):
        records.append(run_method(task, method, sizes, seed))
        if out is not None:  # after every run, so an interrupted comparison keeps what it finished
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "records.json").write_text(json.dumps({**header, "records": records, "complete": False},
                                                               indent=1))
    rows = summarize(records)
    payload = {
        "size": size, "sizes": asdict(sizes), "seeds": list(seeds), "kT": kT, "pair_scale": pair_scale,
        "tasks": {name: {"description": t.description, "alpha": t.alpha, "sde_steps": t.sde_steps,
                         "optimum": t.optimum.as_dict(), "reference": t.reference, **t.extra}
                  for name, t in tasks.items()},
        "records": records, "summary": rows, "wall_s": time.perf_counter() - start, "complete": True,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "records.json").write_text(json.dumps(payload, indent=1))
        (out / "table.md").write_text(format_table(rows, tasks) + "\n")
    payload["table"] = format_table(rows, tasks)
    return payload


def task_differentiable_ok(task: SamplerTask, method: str) -> bool:
    """Reward backpropagation only runs on a differentiable reward."""
    return task.differentiable or method not in ("draft", "draft_truncated")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m boltzlab.finetune.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--kT", type=float, default=0.75, help="tempering target (kT0 = 1)")
    parser.add_argument("--pair-scale", type=float, default=0.5, help="reward per inner pair")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    payload = run_comparison(args.size, methods=args.methods, task_names=args.tasks, seeds=args.seeds, out=args.out,
                             progress=not args.no_progress, kT=args.kT, pair_scale=args.pair_scale)
    print(payload["table"])
    print(f"wrote {args.out / 'records.json'} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
