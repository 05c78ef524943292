r"""Where an iDEM outer iteration spends its time: ``python -m boltzlab train TARGET --profile``.

The profile runs the real training loop (:func:`boltzlab.training.idem.train_idem`) for two
short outer iterations of ``regression_steps`` regression steps and ``sde_steps`` reverse-SDE
steps each, keeps the second (the first pays for torch.compile and warm-up), and scales its
phase times (:data:`~boltzlab.training.idem.PHASES`) to the config's own sizes:

    seconds per outer iteration = (measured seconds / measured steps) * (config's steps),

per phase: target estimation, network forward/backward and optimiser scale with
``inner_steps``, the refill with ``sde_steps`` (its batch, ``n_refill``, is the real one).
The evaluation (``n_eval`` samples and the metrics) is timed on its own and reported per
evaluation and spread over ``eval_every`` outer iterations. The scaling is exact for the
costs that are linear in the number of steps, which all of these are once warm.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from unittest import mock

import torch

from boltzlab.energies import get_target
from boltzlab.training import idem
from boltzlab.training.compiled import maybe_compiled

if TYPE_CHECKING:
    from boltzlab.models import EGNNLayer


@dataclass(frozen=True)
class TrainingProfile:
    """Seconds per outer iteration of ``config``, by phase, and the derived rates.

    ``seconds``: phase -> seconds per outer iteration (``"evaluation"`` amortised over
    ``eval_every``); ``seconds_per_evaluation``; ``regression_steps_per_s`` (refill included,
    evaluation excluded); ``refill_samples_per_s``; ``compiled``; ``world`` (processes).
    """

    config: idem.IDEMConfig
    seconds: dict[str, float]
    seconds_per_evaluation: float
    regression_steps_per_s: float
    refill_samples_per_s: float
    compiled: bool
    world: int

    def summary(self) -> dict[str, object]:
        """The numbers as a JSON-ready dict (``python -m boltzlab train ... --profile`` prints it last)."""
        return {"profile": self.config.target, "world": self.world, "compiled": self.compiled,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
                "seconds_per_evaluation": round(self.seconds_per_evaluation, 3),
                "regression_steps_per_s": self.regression_steps_per_s,
                "refill_samples_per_s": self.refill_samples_per_s}

    def table(self) -> str:
        """The profile as a Markdown table, one row per phase, with shares of the total."""
        total = sum(self.seconds.values())
        c = self.config
        lines = [f"iDEM {c.target}: hidden {c.hidden} x {c.n_layers} layers, B = {c.batch_size}, K = {c.n_mc}, "
                 f"{c.inner_steps} regression steps and {c.n_refill} x {c.sde_steps} refill per outer iteration, "
                 f"{self.world} process(es), compiled: {self.compiled}, precision: {c.precision}",
                 "",
                 "| phase | s / outer iteration | share |",
                 "|---|---|---|"]
        for phase, sec in self.seconds.items():
            lines.append(f"| {phase} | {sec:.3g} | {100 * sec / total:.1f}% |")
        lines += [f"| total | {total:.3g} | 100% |", "",
                  f"regression steps / s (refill included, evaluation excluded): {self.regression_steps_per_s:.3g}",
                  f"refill samples / s: {self.refill_samples_per_s:.3g}",
                  f"one evaluation ({c.n_eval} samples): {self.seconds_per_evaluation:.3g} s"]
        return "\n".join(lines)


def profile_training(config: idem.IDEMConfig, *, regression_steps: int = 5, sde_steps: int = 5,
                     compile: bool | None = None, progress: bool = False, baseline: bool = False) -> TrainingProfile:
    """Profile one outer iteration of ``config`` (see the module docstring). Under
    ``torchrun``/``--procs`` every rank runs it; the evaluation is timed on rank 0.

    ``baseline=True`` profiles the loop as it ran before the fused estimator (commit cf35560):
    the same loop with its regression targets from
    :func:`boltzlab.kernels.benchmark.materialised_mc_score` and no compilation, the
    baseline of ``benchmarks/bench_training.py``."""
    if regression_steps < 1 or sde_steps < 1:
        raise idem.TrainingConfigError(f"need regression_steps, sde_steps >= 1, got {regression_steps}, {sde_steps}")
    compiled = idem.network_compiled(config, compile) and not baseline
    short = replace(config, n_outer=2, inner_steps=regression_steps, sde_steps=sde_steps, eval_every=10**9)
    # the evaluation at the end of the short run uses few samples; it is timed separately below
    short = replace(short, n_eval=min(config.n_eval, 16))
    with contextlib.ExitStack() as stack:
        if baseline:
            from boltzlab.kernels.benchmark import materialised_mc_score
            from boltzlab.models import EGNNLayer

            stack.enter_context(mock.patch.object(idem, "mc_score", materialised_mc_score))
            stack.enter_context(mock.patch.object(EGNNLayer, "forward", baseline_egnn_layer_forward))
        return _profile(config, short, regression_steps, sde_steps, compiled, progress)


def _profile(config: idem.IDEMConfig, short: idem.IDEMConfig, regression_steps: int, sde_steps: int,
             compiled: bool, progress: bool) -> TrainingProfile:
    state = idem.train_idem(short, None, progress=progress, compile=compiled)
    last = state.history[-1]
    steps_scale = config.inner_steps / regression_steps
    seconds = {phase: last[f"seconds_{phase}"] * steps_scale for phase in ("target", "network", "optimizer")}
    seconds["refill"] = last["seconds_refill"] * config.sde_steps / sde_steps
    rank, world = idem.rank_and_world()
    energy = get_target(config.target)
    per_eval = 0.0
    if rank == 0:
        gen = torch.Generator().manual_seed(config.seed)
        reference = idem.evaluation_reference(config.target, config.n_eval, gen)
        # the evaluation samples through the same (compiled or eager) forward as training does;
        # one untimed step first, so compiling for this batch size is not counted
        forward = maybe_compiled(state.ema, compiled)
        with torch.no_grad():
            idem.sample_model(state.ema, short, energy, config.n_eval, gen, sde_steps=1, forward=forward)
        start = time.perf_counter()
        with torch.no_grad():
            x = idem.sample_model(state.ema, short, energy, config.n_eval, gen, forward=forward)
        sampling = (time.perf_counter() - start) * config.sde_steps / sde_steps
        start = time.perf_counter()
        idem.evaluate_samples(energy, x, reference, gen)
        per_eval = sampling + time.perf_counter() - start
    seconds["evaluation"] = per_eval / config.eval_every
    loop = sum(v for k, v in seconds.items() if k != "evaluation")
    return TrainingProfile(config=config, seconds=seconds, seconds_per_evaluation=per_eval,
                           regression_steps_per_s=config.inner_steps / loop,
                           refill_samples_per_s=config.n_refill / seconds["refill"], compiled=compiled, world=world)


def baseline_egnn_layer_forward(self: "EGNNLayer", h: torch.Tensor, x: torch.Tensor,
                                features_shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`~boltzlab.models.EGNNLayer`'s forward pass as it was at commit cf35560, kept for
    the baseline of ``--profile-baseline``: every ordered pair (i, j) of the n x n grid, the
    diagonal masked out, whether or not the features are shared. Same parameters, same function."""
    n = x.shape[1]
    diff = x[:, :, None, :] - x[:, None, :, :]
    d2 = diff.pow(2).sum(-1, keepdim=True)
    off_diag = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)[None, :, :, None]
    w, H = self.edge_in.weight, self.hidden
    pre = (torch.nn.functional.linear(h, w[:, :H])[:, :, None, :]
           + torch.nn.functional.linear(h, w[:, H:2 * H])[:, None, :, :]
           + d2 * w[:, 2 * H] + self.edge_in.bias)
    m = self.edge_out(pre) * off_diag
    coef = self.coord_mlp(m) * off_diag / (d2 + 1.0).sqrt()
    x_new = x + (diff * coef).sum(2) / (n - 1)
    if self.node_mlp is None:
        return h, x_new
    return h + self.node_mlp(torch.cat([h, m.sum(2) / (n - 1)], dim=-1)), x_new


def sde_step_sweep(sampler: idem.TrainedSampler, steps: tuple[int, ...], increments: tuple[str, ...] = ("euler", "exact"),
                   n: int = 1_000, seed: int = 0, progress: bool = False) -> list[dict[str, float | str]]:
    """Metrics of ``n`` reverse-SDE samples of a trained sampler against the number of SDE
    steps and the variance increment (:func:`boltzlab.diffusion.reverse_sde_sample`): one row
    per (increment, steps) with the metrics of :func:`boltzlab.training.idem.evaluate_samples`
    and the sampling time. Every row starts from the same prior draws (same seed)."""
    from tqdm.auto import tqdm

    config = sampler.config
    reference = idem.evaluation_reference(config.target, n, torch.Generator().manual_seed(seed + 7))
    rows: list[dict[str, float | str]] = []
    grid = [(inc, k) for inc in increments for k in steps]
    for increment, k in tqdm(grid, desc="SDE steps", disable=not progress):
        cfg = replace(config, sde_increment=increment)
        gen = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with torch.no_grad():
            x = idem.sample_model(sampler.model, cfg, sampler.energy, n, gen, sde_steps=k)
        seconds = time.perf_counter() - start
        metrics = idem.evaluate_samples(sampler.energy, x, reference, torch.Generator().manual_seed(seed + 1))
        rows.append({"increment": increment, "sde_steps": float(k), "seconds": round(seconds, 2), **metrics})
    return rows
