r"""Training coupling flows (chapters 02 and 03), and grid tools for 2-D flows.

In :func:`train`:

- maximum likelihood on samples:  L_ML = -E_data[log q(x)]
- reverse KL from the energy alone:  L_KL = E_q[E(x)/kT + log q(x)] = -log Z + KL(q || p)
  (the variational free energy in units of kT, bounded below by -log Z)
- a mix (1 - λ) L_KL + λ L_ML, and a temperature schedule kT_t for L_KL;

and temperature annealing as a curriculum in :func:`train_annealed` (reverse KL at a high
temperature, then maximum likelihood on the flow's own samples reweighted to ever lower
temperatures).

Also here: two grid tools for 2-D flows (:func:`log_prob_on_grid`, :func:`kl_on_grid`)
that give numbers independent of Monte Carlo. Training loops share
:func:`boltzlab.training.run_training`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab.energies import Energy
from boltzlab.flows.coupling import Flow, FlowInputError, _check_points
from boltzlab.metrics import grid_2d, kish_ess
from boltzlab.training import Evaluation, TrainingHistory, run_training

__all__ = [
    "ladder_table",
    "train",
    "annealing_schedule",
    "AnnealingStage",
    "train_annealed",
    "log_prob_on_grid",
    "kl_on_grid",
]

# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def annealing_schedule(kT_start: float, kT_end: float, n_steps: int, anneal_fraction: float = 0.7) -> Tensor:
    """Temperatures ``(n_steps,)``: geometric from ``kT_start`` to ``kT_end`` over the first
    ``anneal_fraction`` of the steps, then constant at ``kT_end`` (so the model settles at the target)."""
    if not (kT_start > 0 and kT_end > 0):
        raise ValueError(f"temperatures must be positive, got {kT_start} and {kT_end}")
    if not 0 < anneal_fraction <= 1:
        raise ValueError(f"anneal_fraction must lie in (0, 1], got {anneal_fraction}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be positive, got {n_steps}")
    n_anneal = max(1, round(anneal_fraction * n_steps))
    ramp = torch.logspace(math.log10(kT_start), math.log10(kT_end), n_anneal, dtype=torch.float64)
    return torch.cat([ramp, torch.full((n_steps - n_anneal,), float(kT_end), dtype=torch.float64)])


def train(
    flow: Flow,
    n_steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    data: Tensor | None = None,
    energy: Energy | None = None,
    ml_weight: float | None = None,
    data_log_weights: Tensor | None = None,
    kT: float | Tensor | None = None,
    seed: int = 0,
    max_grad_norm: float = 100.0,
    evaluate: Evaluation | None = None,
    eval_every: int = 0,
    progress: bool = True,
) -> TrainingHistory:
    r"""Train ``flow`` with Adam (learning rate cosine-decayed from ``lr`` to ``lr``/20).

    The loss at step t is  (1 - λ) L_KL + λ L_ML  with

        L_ML = -(1/B) Σ_b log q(x_b),  x_b a minibatch of ``data`` ``(n, dim)``
               (drawn uniformly, or with probability ∝ exp(``data_log_weights``) ``(n,)``:
               maximum likelihood of the reweighted sample),
        L_KL = (1/B) Σ_b [E(x_b)/kT_t + log q(x_b)],  x_b ~ q (reparameterised samples).

    Give ``data`` only (maximum likelihood, λ = 1), ``energy`` only (reverse KL, λ = 0), or
    both with ``ml_weight`` = λ in (0, 1). ``kT`` is the temperature of L_KL: a number or a
    schedule ``(n_steps,)`` (see :func:`annealing_schedule`); default ``energy.kT``.
    Minibatches and base samples come from a generator seeded with ``seed``, so a run is
    reproducible given the flow's initial parameters.

    Returns a :class:`boltzlab.training.TrainingHistory` with, per step, ``"loss"``, and
    ``"reverse_kl"`` and ``"kT"`` when an energy is used, ``"nll"`` when data are.
    ``evaluate()`` (no arguments, run without gradients after every ``eval_every`` steps
    and after the last) may return more numbers, kept in ``history.evaluations``.
    A loss that becomes NaN or infinite stops training with a ValueError.
    """
    ml_weight = _check_training_request(flow, n_steps, batch_size, data, energy, ml_weight)
    data_probs = None if data_log_weights is None else _sampling_probabilities(data_log_weights, data)
    schedule = _temperatures(kT, energy, n_steps)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps, eta_min=lr / 20)

    def step(t: int) -> dict[str, float]:
        record: dict[str, float] = {}
        loss = torch.zeros(())
        if ml_weight < 1:
            assert energy is not None
            x, log_q = flow.sample(batch_size, generator=generator)
            kl_term = (energy.energy(x) / schedule[t] + log_q).mean()
            loss = loss + (1 - ml_weight) * kl_term
            record.update(reverse_kl=kl_term.item(), kT=float(schedule[t]))
        if ml_weight > 0:
            assert data is not None
            if data_probs is None:
                idx = torch.randint(data.shape[0], (batch_size,), generator=generator)
            else:
                idx = torch.multinomial(data_probs, batch_size, replacement=True, generator=generator)
            ml_term = -flow.log_prob(data[idx]).mean()
            loss = loss + ml_weight * ml_term
            record["nll"] = ml_term.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        lr_decay.step()
        return {"loss": loss.item(), **record}

    return run_training(step, n_steps, progress=progress, desc="training flow", evaluate=evaluate,
                        eval_every=eval_every)


def _check_training_request(flow: Flow, n_steps: int, batch_size: int, data: Tensor | None,
                            energy: Energy | None, ml_weight: float | None) -> float:
    """Validate what :func:`train` was asked to do; returns the weight λ of maximum likelihood."""
    if data is None and energy is None:
        raise ValueError("train needs data (maximum likelihood), an energy (reverse KL), or both")
    if ml_weight is None:
        if data is not None and energy is not None:
            raise ValueError("with both data and an energy, give ml_weight (the weight λ of maximum likelihood)")
        ml_weight = 1.0 if energy is None else 0.0
    if not 0.0 <= ml_weight <= 1.0:
        raise ValueError(f"ml_weight must lie in [0, 1], got {ml_weight}")
    if ml_weight > 0 and data is None:
        raise ValueError(f"ml_weight = {ml_weight} needs data for the maximum-likelihood term")
    if ml_weight < 1 and energy is None:
        raise ValueError(f"ml_weight = {ml_weight} < 1 needs an energy for the reverse-KL term")
    if n_steps < 1 or batch_size < 1:
        raise ValueError(f"n_steps and batch_size must be positive, got {n_steps} and {batch_size}")
    if data is not None:
        _check_points(data, flow.dim, "data")
        if data.ndim != 2:
            raise FlowInputError(f"data: expected shape (n_samples, {flow.dim}), got {tuple(data.shape)}")
    if energy is not None and energy.dim != flow.dim:
        raise ValueError(f"energy {energy.name} has dim {energy.dim} but the flow has dim {flow.dim}")
    return float(ml_weight)


def _sampling_probabilities(log_w: Tensor, data: Tensor | None) -> Tensor:
    """softmax(log_w) in float64: the probability of drawing each data point into a minibatch."""
    if data is None or log_w.shape != data.shape[:1]:
        expected = f"({data.shape[0]},)" if data is not None else "that of data (none given)"
        raise ValueError(f"data_log_weights must have shape {expected}, got {tuple(log_w.shape)}")
    if bool(torch.isnan(log_w).any()) or not bool(torch.isfinite(log_w).any()):
        raise ValueError("data_log_weights contain NaN, or not a single finite weight")
    return torch.softmax(log_w.detach().to(torch.float64), 0)


@dataclass
class AnnealingStage:
    """One rung of :func:`train_annealed`: its temperature, the Kish ESS fraction of the pool
    reweighted to it (NaN for the first rung, trained by reverse KL), its training history, and
    ``samples`` ``(n_record, dim)`` drawn from the flow once the rung was fitted."""

    kT: float
    ess_fraction: float
    history: TrainingHistory
    samples: Tensor


def ladder_table(stages: Sequence[AnnealingStage]):
    """The rungs of :func:`train_annealed` as a :class:`boltzlab.tables.Table`: kT and the pool's
    ESS fraction per rung (the first rung, fitted by reverse KL, has no pool)."""
    from boltzlab.tables import table

    return table([{"rung": k, "kT": s.kT, "ESS / pool": None if math.isnan(s.ess_fraction) else s.ess_fraction}
                  for k, s in enumerate(stages)], float_format=".3f", formats={"kT": ".2f"},
                 caption="annealing ladder (rung 0: reverse KL, no pool)")


def train_annealed(
    flow: Flow,
    energy: Energy,
    kT_ladder: Sequence[float] | Tensor,
    first_steps: int,
    steps_per_stage: int,
    pool_size: int = 10_000,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    n_record: int = 2000,
    progress: bool = True,
) -> list[AnnealingStage]:
    r"""Temperature annealing as a curriculum, by reweighted maximum likelihood.

    1. Fit q to p_0 ∝ exp(-E/T_0) at the first (highest) temperature of ``kT_ladder`` by
       reverse KL for ``first_steps`` steps: hot enough, p_0 is one smooth blob, so there
       is nothing to collapse onto.
    2. For each next rung T_k: draw ``pool_size`` samples x ~ q from the current flow, weight
       them toward p_k ∝ exp(-E/T_k),

           log w = -E(x)/T_k - log q(x),

       and fit q to the reweighted pool by maximum likelihood for ``steps_per_stage`` steps
       (:func:`train` with ``data_log_weights``). Maximum likelihood covers mass, so modes
       the pool holds are kept while they sharpen.

    The ladder must decrease to the target temperature; adjacent rungs must be close enough
    that the weights keep a useful effective sample size, which is recorded per stage.
    """
    ladder = [float(t) for t in torch.as_tensor(kT_ladder, dtype=torch.float64).reshape(-1)]
    if len(ladder) < 2 or any(not (t > 0 and math.isfinite(t)) for t in ladder):
        raise ValueError(f"kT_ladder needs at least two positive temperatures, got {ladder}")
    if any(b >= a for a, b in zip(ladder[:-1], ladder[1:])):
        raise ValueError(f"kT_ladder must decrease (hot to cold), got {ladder}")
    if pool_size < batch_size:
        raise ValueError(f"pool_size ({pool_size}) must be at least batch_size ({batch_size})")
    generator = torch.Generator().manual_seed(seed)

    def record() -> Tensor:
        with torch.no_grad():
            return flow.sample(n_record, generator=generator)[0]

    first = train(flow, first_steps, batch_size, lr, energy=energy, kT=ladder[0], seed=seed, progress=False)
    stages = [AnnealingStage(ladder[0], float("nan"), first, record())]
    for k, kT in enumerate(tqdm(ladder[1:], desc="annealing", disable=not progress), start=1):
        with torch.no_grad():
            pool, log_q = flow.sample(pool_size, generator=generator)
            log_w = -energy.energy(pool) / kT - log_q
        history = train(flow, steps_per_stage, batch_size, lr, data=pool, data_log_weights=log_w, seed=seed + k,
                        progress=False)
        stages.append(AnnealingStage(kT, kish_ess(log_w) / pool_size, history, record()))
    return stages


def _temperatures(kT: float | Tensor | None, energy: Energy | None, n_steps: int) -> Tensor:
    if energy is None:
        return torch.full((n_steps,), float("nan"), dtype=torch.float64)
    if kT is None:
        kT = energy.kT
    schedule = torch.as_tensor(kT, dtype=torch.float64)
    if schedule.ndim == 0:
        schedule = schedule.expand(n_steps)
    if schedule.shape != (n_steps,):
        raise ValueError(f"kT must be a number or a schedule of shape ({n_steps},), got shape {tuple(schedule.shape)}")
    if not bool((schedule > 0).all() & torch.isfinite(schedule).all()):
        raise ValueError("every temperature in the kT schedule must be positive and finite")
    return schedule


# ----------------------------------------------------------------------------------------
# Grid tools for 2-D flows
# ----------------------------------------------------------------------------------------


def log_prob_on_grid(flow: Flow, xlim: tuple[float, float], ylim: tuple[float, float],
                     grid: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    """log q on the cell centres of a ``grid × grid`` grid over ``xlim × ylim`` (2-D flows):
    returns ``(xs (grid,), ys (grid,), log_q (grid, grid))`` with ``log_q[j, i]`` at (xs[i], ys[j]),
    computed without gradients."""
    if flow.dim != 2:
        raise ValueError(f"log_prob_on_grid needs a 2-D flow, got dim {flow.dim}")
    xs, ys, points, _ = grid_2d(xlim, ylim, grid)
    points = points.reshape(-1, 2)
    p = flow._first_parameter_or_buffer()
    with torch.no_grad():
        log_q = flow.log_prob(points.to(p.dtype)).to(torch.float64)
    return xs, ys, log_q.reshape(grid, grid)


def kl_on_grid(flow: Flow, energy: Energy, log_z: float, xlim: tuple[float, float], ylim: tuple[float, float],
               grid: int = 400) -> tuple[float, float]:
    r"""KL(q || p) by quadrature for a 2-D flow and a target with known log Z:

        KL = Σ_cells A q(x) [log q(x) - log p(x)],   log p = -E/kT - log Z,

    with A the cell area. Returns ``(KL, mass of q on the window)``; the mass should be
    close to 1, otherwise the window misses part of q and the KL is incomplete.
    Independent of Monte Carlo, so it checks sample-based estimates."""
    if energy.dim != 2:
        raise ValueError(f"kl_on_grid needs a 2-D energy, got dim {energy.dim}")
    xs, ys, log_q = log_prob_on_grid(flow, xlim, ylim, grid)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    log_p = -energy.energy(torch.stack([xx, yy], dim=-1)) / energy.kT - log_z
    area = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
    q = log_q.exp()
    return float((q * (log_q - log_p)).sum() * area), float(q.sum() * area)
