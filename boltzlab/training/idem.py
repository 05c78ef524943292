r"""iDEM, pDEM and NEM: training a diffusion sampler from the energy alone (chapter 06).

iDEM (Akhound-Sadegh et al. 2024) alternates two loops.

- inner (simulation-free regression): draw x_0 from a replay buffer, noise it,
  x_t = x_0 + sigma_t eps, and regress the score network onto the clipped Monte Carlo
  estimate of the noised score (:func:`boltzlab.estimators.mc_score`)

      S_K(x_t, t) = sum_k softmax_k(-E(x_t + sigma_t u_k)/kT) F(x_t + sigma_t u_k)/kT

  or, by default, its blend with the noise form sum_k w_k u_k / sigma_t
  (:func:`boltzlab.estimators.blended_score`), which is far quieter at large sigma_t:
  for DW-4 at sigma = 1 the mean squared error of K = 500 targets drops from 176 to 2.4
  (chapter 06 measures it);
      L(theta) = E_t,x_t [ lambda(t) || s_theta(x_t, t) - clip(S_K(x_t, t)) ||^2 ],
      lambda(t) = sigma_t^2 + local_scale^2   (with :class:`~boltzlab.diffusion.ScaledScore`,
      an order-one loss at every noise level);

- outer: run the reverse SDE of the current model (its exponential moving average) and
  add the samples to the buffer, so training points follow the model towards the target.

pDEM (``method="pdem"``, the iDEM paper's ablation) regresses onto the same targets at points
drawn from the prior N(0, sigma_1^2 I) instead of the buffer: no outer loop, and training
points that rarely come near the target's wells.

NEM (``method="nem"``, noised energy matching) learns the noised energy instead: a scalar
network E_theta(x, t) is regressed onto the
Monte Carlo estimate of E_t(x) = -kT log E_u[exp(-E(x + sigma_t u)/kT)],

      Ê_K(x_t, t) = -kT [ logsumexp_k(-E(x_t + sigma_t u_k)/kT) - log K ],

and sampling uses its score -∇E_theta / kT. (The log of an average is biased for finite K,
like the score estimator; chapter 05 measures that bias.)

Everything that makes a run reproducible and honest is here: a dataclass config per
target (:data:`CONFIGS`), one ``torch.Generator`` for all randomness, resumable
checkpoints (stop and continue equals an uninterrupted run with the same seed), and
``energy_evaluations``, the number of target-energy evaluations spent on training, which
chapter 06 gives to MCMC as its budget. With ``--procs P`` (or under ``torchrun``) the loop
runs data-parallel with :class:`~torch.nn.parallel.DistributedDataParallel` (NCCL on GPUs,
gloo on CPUs) at the same global sizes (:func:`train_idem`); every regression target comes
from one fused, streamed pass of :func:`boltzlab.kernels.mc_score_estimate`.

The package around this module: :mod:`.idem_config` (configs and presets), :mod:`.sampler`
(the score network and its reverse SDE), :mod:`.checkpoints` (state, resume, warm start),
:mod:`.parallel`
(ranks and collectives), :mod:`.compiled` (torch.compile with a fallback), :mod:`.profile`
(where the time goes), :mod:`.mcmc_baseline` (MCMC at the same energy budget) and
:mod:`.cli`, the command line: ``python -m boltzlab train TARGET --out DIR [--resume |
--auto-resume] [--stop-after N] [--preset paper] [--set FIELD=VALUE ...] [--procs P]
[--baseline] [--profile]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzlab import metrics
from boltzlab.diffusion import (
    perturb,
    sample_prior,
    sample_times,
)
from boltzlab.energies import Energy, GaussianMixture, PairPotential, get_target
from boltzlab.estimators import clip_for, draw_eps, mc_score, shifted_lse_score
from boltzlab.mcmc import mala_refine
from boltzlab.training.checkpoints import (  # noqa: F401 (re-exported)
    WARM_START_FIXED,
    TrainedSampler,
    TrainingState,
    _load_payload,
    _sampler_from_payload,
    initial_state,
    load_sampler,
    load_state,
    save_checkpoint,
    shipped_checkpoint,
    warm_start_state,
    write_run_files,
)
from boltzlab.training.compiled import compile_wanted, maybe_compiled, with_precision
from boltzlab.training.idem_config import (  # noqa: F401 (re-exported: the training API in one place)
    CHECKPOINT,
    CONFIGS,
    METHODS,
    NETWORKS,
    PAPER_CONFIGS,
    PRESETS,
    SHIPPED_DIR,
    SHIPPED_PHASES,
    CheckpointError,
    IDEMConfig,
    TrainingConfigError,
    config_for,
)
from boltzlab.training.parallel import (
    all_mean,
    all_sum,
    check_ranks_in_sync,
    gather_rank_states,
    rank_and_world,
    rank_share,
)
from boltzlab.training.sampler import (  # noqa: F401 (re-exported)
    _projection,
    build_model,
    negative_time,
    sample_model,
    sampling_energy_evaluations,
)

# ----------------------------------------------------------------------------------------
# the two loops
# ----------------------------------------------------------------------------------------


def noised_energy_estimate(energy: Energy, x_t: Tensor, sigma: Tensor, n_mc: int,
                           generator: torch.Generator | None = None) -> Tensor:
    """Ê_K(x_t) = -kT [logsumexp_k(-E(x_t + sigma u_k)/kT) - log K]: (B, dim), (B,) -> (B,)."""
    u = torch.randn(x_t.shape[0], n_mc, x_t.shape[1], generator=generator, dtype=x_t.dtype, device=x_t.device)
    project = _projection(energy)
    if project is not None:
        u = project(u)
    e = energy.energy(x_t[:, None, :] + sigma[:, None, None] * u)
    return -energy.kT * (torch.logsumexp(-e / energy.kT, dim=1) - math.log(n_mc))


def regression_target(config: IDEMConfig, energy: Energy, x0: Tensor, generator: torch.Generator,
                      compile: bool | None = None, proposal: nn.Module | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Noised points and their regression targets for buffer states ``x0`` (B, dim).

    Returns ``x_t`` (B, dim), ``t`` (B,) and the target: for iDEM the clipped Monte Carlo
    score (B, dim) from one streamed pass of the fused estimator (``compile`` as in
    :func:`boltzlab.estimators.mc_score`); for NEM the noised-energy estimate (B,). No
    gradients; this is where every target-energy evaluation happens. With ``proposal`` (a score
    network: the EMA sampler in training) and ``config.proposal_sigma`` > 0, the targets at
    sigma_t <= proposal_sigma draw their K copies around x_t + sigma_t^2 s(x_t, t) instead of x_t
    (:func:`boltzlab.estimators.shifted_lse_score`: the same limit, reweighted exactly).
    """
    schedule = config.schedule
    t = sample_times(x0.shape[0], generator=generator, t_min=config.t_min, dtype=x0.dtype)
    x_t, _ = perturb(x0, t, schedule, project=_projection(energy), generator=generator)
    sigma = schedule.std(t)
    with torch.no_grad():
        if config.method == "nem":
            return x_t, t, noised_energy_estimate(energy, x_t, sigma, config.n_mc, generator)
        low = sigma <= config.proposal_sigma
        if proposal is None or config.proposal_sigma <= 0 or not bool(low.any()):
            return x_t, t, mc_target(config, energy, x_t, sigma, generator, compile)
        # the proposal network sees the whole batch: one input shape, so a compiled one compiles once
        shift = sigma[:, None] ** 2 * proposal(x_t, t).float().to(x_t.dtype)
        project = _projection(energy)
        shift = project(shift) if project is not None else shift
        target = torch.empty_like(x_t)
        high = ~low
        if bool(high.any()):
            target[high] = mc_target(config, energy, x_t[high], sigma[high], generator, compile)
        eps = draw_eps(energy, int(low.sum()), config.n_mc, generator, dtype=x_t.dtype, device=x_t.device)
        shifted = shifted_lse_score(energy, x_t[low], sigma[low], shift[low], eps)
        clip = target_clip(config, sigma[low])
        target[low] = shifted if clip is None else clip_for(energy, shifted, clip)
    return x_t, t, target


def mc_target(config: IDEMConfig, energy: Energy, x_t: Tensor, sigma: Tensor, generator: torch.Generator,
              compile: bool | None = None) -> Tensor:
    """iDEM's Monte Carlo target at ``x_t`` (B, dim) with noise levels ``sigma`` (B,): the config's
    estimator over K = ``n_mc`` copies around x_t (the blended one switching at ``blend_scale``,
    else ``local_scale``), clipped by :func:`target_clip`. (B, dim)."""
    switch = config.local_scale if config.blend_scale is None else config.blend_scale
    extra = {"local_scale": switch} if config.estimator == "blended" else {}
    return mc_score(energy, x_t, sigma, config.n_mc, generator=generator, max_norm=target_clip(config, sigma),
                    estimator=config.estimator, compile=compile, **extra)  # type: ignore[arg-type]


def target_clip(config: IDEMConfig, sigma: Tensor) -> float | Tensor | None:
    """The clip norm of each regression target, for noise levels ``sigma`` (B,): ``max_norm``,
    or with ``clip_sigma`` > 0 the per-point ``max_norm * max(1, clip_sigma / sigma)`` (B,); with
    ``max_norm_high`` that norm instead wherever sigma >= ``sigma_high``."""
    if config.max_norm is None:
        return None
    if config.clip_sigma == 0 and config.max_norm_high is None:
        return config.max_norm
    clip = config.max_norm * (config.clip_sigma / sigma).clamp(min=1.0) if config.clip_sigma > 0 \
        else torch.full_like(sigma, config.max_norm)
    if config.max_norm_high is not None:
        clip = torch.where(sigma >= config.sigma_high, torch.full_like(clip, config.max_norm_high), clip)
    return clip


def target_loss(model: nn.Module, config: IDEMConfig, energy: Energy, x_t: Tensor, t: Tensor,
                target: Tensor) -> Tensor:
    """The weighted regression of the model onto :func:`regression_target`'s targets (a scalar).

    iDEM: mean of lambda(t) |s_theta(x_t, t) - target|^2 with lambda = sigma_t^2 + local_scale^2
    (:class:`~boltzlab.diffusion.ScaledScore`'s weight: an order-one loss at every t); NEM:
    mean of (E_theta(x_t, t) - target)^2 / kT^2.
    """
    if config.method == "nem":
        inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        # energies in kT units, equally weighted over t (their scale does not blow up at small t)
        return ((inner.energy(x_t, t) - target).pow(2) / energy.kT**2).mean()
    score = model(x_t, t)
    squared = (score - target).pow(2).sum(-1)
    if config.loss_weight == "one":
        loss = squared.mean()
    else:
        loss = ((config.schedule.variance(t) + config.local_scale**2) * squared).mean()
    if config.virial_weight > 0:
        loss = loss + config.virial_weight * virial_penalty(energy, x_t, t, score, config.virial_bins, config.t_min)
    return loss


def virial_penalty(energy: Energy, x_t: Tensor, t: Tensor, score: Tensor, n_bins: int, t_min: float = 0.0) -> Tensor:
    """sum_b (n_b / B) ((V_b + d_free) / d_free)^2, differentiable in ``score`` (B, dim): V_b the
    mean virial (x_t - c) . s of the points whose t (B,) falls in bin b of ``n_bins`` equal bins
    of [t_min, 1], n_b their number, d_free = (n - 1) d. Zero in expectation-squared terms for
    the exact score at exact samples of p_t (:func:`boltzlab.metrics.score_virial`); only bins
    with points count."""
    if not isinstance(energy, PairPotential):
        raise TrainingConfigError("the virial penalty needs a particle system (centre-of-mass-free)")
    n, d = energy.n_particles, energy.spatial_dim
    r = x_t.reshape(-1, n, d)
    virial = ((r - r.mean(dim=1, keepdim=True)) * score.reshape(-1, n, d).float()).sum(dim=(1, 2))
    bins = ((t - t_min) / (1.0 - t_min) * n_bins).long().clamp(0, n_bins - 1)
    sums = torch.zeros(n_bins, dtype=virial.dtype, device=virial.device).index_add(0, bins, virial)
    counts = torch.bincount(bins, minlength=n_bins).to(virial.dtype)
    used = counts > 0
    d_free = float((n - 1) * d)
    means = sums[used] / counts[used]
    return ((counts[used] / x_t.shape[0]) * ((means + d_free) / d_free).pow(2)).sum()


# exact GMM-40 samples standing in for "the whole reference set" (the MCMC sets hold 10,000)
WHOLE_EXACT_REFERENCE = 10_000


def evaluation_reference(target: str, n: int | None, generator: torch.Generator | None = None) -> Tensor:
    """Ground-truth samples for evaluation: exact for GMM-40, the shipped MCMC sets otherwise.

    ``n`` samples drawn with ``generator`` (the cheap, logged evaluations during training), or
    ``n=None``: the whole MCMC set (``WHOLE_EXACT_REFERENCE`` exact samples for GMM-40), as the
    final evaluation uses. Why the whole set: a 2000-configuration draw is itself a noisy
    yardstick; LJ-13's distance W2 is dominated by the 4% of configurations with a particle
    far out, and one seeded draw of 2000 held 5.0% of them against 3.8% in the set, which moved
    the shipped sampler's distance W2 from 0.033 (whole set) to 0.040 (chapter 06 shows it).
    """
    energy = get_target(target)
    if isinstance(energy, GaussianMixture):
        return energy.sample(WHOLE_EXACT_REFERENCE if n is None else n, generator=generator)
    from boltzlab.reference import load_reference

    return load_reference(target, n=n, generator=None if n is None else generator)


def evaluate_samples(energy: Energy, x: Tensor, reference: Tensor,
                     generator: torch.Generator | None = None) -> dict[str, float]:
    """The course's metrics of samples ``x`` (N, dim) against ``reference`` (M, dim).

    energy W2 (W2, not W2^2), x-W2 (exact OT, subsets of 1000; saturates in high dimension),
    and for particle systems the interatomic-distance W2 and TVD, for GMM-40 the modes covered.
    Particle systems also get where distance W2 is made: ``distance_w2_tail``, the square root of
    the part of W2^2 from the longest 1% of pairs (:func:`~boltzlab.metrics.distance_w2_by_quantile`),
    and ``beyond_r90``, the share of samples whose :func:`~boltzlab.metrics.cluster_radius`
    exceeds the reference's 90% quantile (0.1 for exact samples): a missing tail of particles
    out of the cluster shows in both. Samples with non-finite energies are dropped before the
    energy metrics and counted.
    """
    e_x, e_ref = energy.energy(x), energy.energy(reference)
    finite = torch.isfinite(e_x)
    out = {
        "energy_w2": metrics.energy_w2(e_x[finite], e_ref),
        "x_w2": metrics.x_w2(x, reference, max_samples=1000, generator=generator),
        "mean_energy": float(e_x[finite].mean()),
        "nonfinite_fraction": float(1.0 - finite.float().mean()),
    }
    if isinstance(energy, PairPotential):
        n, d = energy.n_particles, energy.spatial_dim
        # the pair distances once for the three distance metrics (the reference's are most of the cost)
        d_x, d_ref = metrics.interatomic_distances(x, n, d), metrics.interatomic_distances(reference, n, d)
        out["distance_w2"] = metrics.wasserstein_1d(d_x, d_ref)  # = metrics.distance_w2(x, reference, n, d)
        out["distance_tvd"] = metrics.distance_tvd(d_x, d_ref)
        tail = metrics.wasserstein_1d_by_quantile(d_x, d_ref, edges=(0.0, 0.99, 1.0))[-1]
        out["distance_w2_tail"] = math.sqrt(tail.wp_p)
        out["beyond_r90"] = metrics.share_beyond_radius(x, reference, n, d, level=0.9)
    if isinstance(energy, GaussianMixture):
        covered, _ = metrics.mode_coverage(x, energy.means, energy.std)
        out["modes_covered"] = float(covered)
    return out


# ----------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)


def network_compiled(config: IDEMConfig, compile: bool | None) -> bool:
    """Whether a run of ``config`` puts its score network through torch.compile: ``compile``
    if given (or ``BOLTZLAB_COMPILE``), else for EGNN runs of at least
    :data:`~boltzlab.training.compiled.AUTO_COMPILE_MIN_STEPS` regression steps, where it was
    measured to pay (:mod:`boltzlab.training.compiled`). Never for NEM, whose sampler needs
    autograd."""
    auto_steps = config.n_outer * config.inner_steps if config.network == "egnn" else 0
    return compile_wanted(compile, auto_steps) and config.method != "nem"


PHASES: tuple[str, ...] = ("target", "network", "optimizer", "refill", "evaluation", "checkpoint")
"""The parts of an outer iteration whose wall-clock seconds every history record keeps
(``seconds_PHASE``): target estimation (buffer draw, noising, Monte Carlo targets), the
network's forward and backward pass, the optimiser (gradient clipping, Adam, EMA), the
reverse-SDE refill, the evaluation, and gathering the ranks' states for the checkpoint
(writing it happens after the record is made)."""


class PhaseTimer:
    """Wall-clock seconds per phase: ``with timer("target"): ...``; ``timer.seconds`` maps
    each of :data:`PHASES` to its total."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._phase = ""
        self._start = 0.0

    def __call__(self, phase: str) -> PhaseTimer:
        if phase not in self.seconds:
            raise ValueError(f"unknown phase {phase!r}; known: {', '.join(PHASES)}")
        self._phase = phase
        return self

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._phase] += time.perf_counter() - self._start


def train_idem(config: IDEMConfig, out_dir: str | Path | None = None, *, resume: bool = False,
               stop_after: int | None = None, progress: bool = True, compile: bool | None = None,
               cpu_budget_s: float | None = None, init_from: str | Path | None = None) -> TrainingState:
    """Run (or continue) iDEM, pDEM or NEM training under ``config``.

    Args:
        out_dir: where checkpoints go (written after every outer iteration by rank 0);
            ``None`` keeps everything in memory (notebook demonstrations).
        resume: continue from ``out_dir/checkpoint.pt``; a missing checkpoint is an error.
        stop_after: stop after this many outer iterations in this call (a session's share
            of a long run); the final checkpoint then continues where this one stopped.
        compile: run the score network through torch.compile (training forward and the
            refill's sampler); None decides by :func:`boltzlab.training.compiled.compile_wanted`.
            It changes float32 rounding only, not the algorithm.
        cpu_budget_s: stop (evaluated and saved) after the outer iteration during which this
            call's process CPU time reaches this many seconds: the fixed budget of an
            ablation (:mod:`boltzlab.training.ablation`), fair on a loaded machine where
            wall time is not.
        init_from: a fresh run (not ``resume``) starts from this run directory's checkpoint,
            trained under another config (:func:`warm_start_state`): a second phase of
            training, for example with a changed clip, whose totals include the first.

    Under data parallelism (``torchrun``, or ``python -m boltzlab train ... --procs P``) the
    run is the same algorithm with the same global sizes: each of the P ranks takes
    ``batch_size / P`` points per regression step (DDP averages the gradients), refills its
    own buffer (a 1/P share of ``buffer_capacity``) with its share of ``n_refill``, and the
    checkpoint keeps every rank's buffer and random state.

    Returns the final :class:`TrainingState` (its ``ema`` is the sampler to use).
    """
    energy = get_target(config.target)
    rank, world = rank_and_world()
    if config.batch_size % world:
        raise TrainingConfigError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    out = Path(out_dir) if out_dir is not None else None
    if resume:
        if out is None:
            raise CheckpointError("resume=True needs out_dir")
        state = load_state(out, config, energy)
    elif init_from is not None:
        state = warm_start_state(Path(init_from), config, energy)
    else:
        state = initial_state(config, energy)
    model: nn.Module = state.model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(state.model)
    compiled = network_compiled(config, compile)
    train_forward = with_precision(maybe_compiled(model, compiled), config.precision)
    sample_forward = maybe_compiled(state.ema, compiled)  # evaluations: float32 always
    refill_forward = with_precision(sample_forward, config.precision)
    reference = evaluation_reference(config.target, config.n_eval, torch.Generator().manual_seed(config.seed + 7))
    local_batch = config.batch_size // world
    local_refill = max(1, rank_share(config.n_refill, rank, world))

    from_prior = config.method == "pdem"  # pDEM trains at prior draws: no buffer, no refill
    refill_config = refill_sampler_config(config)
    if len(state.buffer) == 0 and not from_prior:
        # the untrained network's samples seed the buffer: no data is ever used
        state.buffer.add(sample_model(state.ema, refill_config, energy, local_refill, state.generator))
    last = config.n_outer if stop_after is None else min(config.n_outer, state.outer + stop_after)
    bar = tqdm(range(state.outer, last), desc=f"iDEM {config.target}", disable=not progress or rank != 0,
               initial=state.outer, total=config.n_outer)
    per_step = local_batch * config.n_mc
    # the EMA sampler proposes the copies below proposal_sigma (its bfloat16 rounding moves the
    # proposal only; the importance weights are exact for whatever it proposes)
    proposal = {"proposal": refill_forward} if config.proposal_sigma > 0 else {}
    cpu_start = time.process_time()
    for outer in bar:
        start = time.perf_counter()
        cpu_at_start = time.process_time()
        timer = PhaseTimer()
        losses = []
        for _ in range(config.inner_steps):
            with timer("target"):
                if from_prior:
                    x0 = sample_prior(config.schedule, local_batch, energy.dim, project=_projection(energy),
                                      generator=state.generator)
                else:
                    x0 = state.buffer.sample(local_batch, state.generator)
                # a long compiled run compiles the estimator's blocks too, whatever their size
                x_t, t, target = regression_target(config, energy, x0, state.generator, compile=compiled or None,
                                                   **proposal)
            with timer("network"):
                loss = target_loss(train_forward, config, energy, x_t, t, target)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with timer("optimizer"):
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), config.grad_clip)
                state.optimizer.step()
                _ema_update(state.ema, state.model, config.ema_decay)
            losses.append(float(loss.detach()))
        state.energy_evaluations += int(all_sum(config.inner_steps * per_step))
        if not from_prior:
            with timer("refill"):
                state.buffer.add(sample_model(state.ema, refill_config, energy, local_refill, state.generator,
                                              forward=refill_forward))
            state.energy_evaluations += int(all_sum(sampling_energy_evaluations(config, local_refill)))
            if config.buffer_mala_steps:
                with timer("refill"):  # moving the buffer is part of refilling it
                    state.buffer.replace_states(mala_refine(energy, state.buffer.data, config.buffer_mala_steps,
                                                            state.generator))
                state.energy_evaluations += int(all_sum(len(state.buffer) * config.buffer_mala_steps))
        state.outer = outer + 1
        spent = cpu_budget_s is not None and all_sum(float(time.process_time() - cpu_start >= cpu_budget_s)) > 0
        if spent:
            last = state.outer
        record = {"outer": float(state.outer), "loss": all_mean(sum(losses) / len(losses)),
                  "energy_evaluations": float(state.energy_evaluations)}
        # evaluate on schedule, at the end, and when this call stops early (so every saved
        # checkpoint has metrics for the weights it holds)
        if rank == 0 and (state.outer % config.eval_every == 0 or state.outer == last):
            with timer("evaluation"):
                eval_gen = torch.Generator().manual_seed(config.seed + 10_007 * state.outer)
                with torch.no_grad():
                    x = sample_model(state.ema, config, energy, config.n_eval, eval_gen, forward=sample_forward)
                result = {"outer": float(state.outer), "energy_evaluations": float(state.energy_evaluations),
                          **evaluate_samples(energy, x, reference, eval_gen)}
                state.evaluations.append(result)
                if out is not None:
                    out.mkdir(parents=True, exist_ok=True)
                    torch.save(x.float().clone(), out / "samples.pt")  # the evaluated samples, for notebooks
            bar.set_postfix({k: f"{v:.3g}" for k, v in result.items() if k in ("energy_w2", "x_w2", "modes_covered",
                                                                             "distance_tvd")})
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"iDEM loss became non-finite at outer iteration {state.outer}; lower lr")
        rank_states = None
        if out is not None:
            with timer("checkpoint"):
                rank_states = gather_rank_states(state)
        # training time, as before phases were timed: without evaluation and checkpointing
        state.wall_time += time.perf_counter() - start - timer.seconds["evaluation"] - timer.seconds["checkpoint"]
        state.cpu_time += time.process_time() - cpu_at_start
        record.update({f"seconds_{phase}": round(sec, 4) for phase, sec in timer.seconds.items()})
        state.history.append(record)
        if out is not None and rank == 0:
            save_checkpoint(state, config, out, rank_states)
        if spent:
            break
    bar.close()
    if init_from is not None and state.outer == last and out is not None and not (out / CHECKPOINT).is_file():
        # a warm start that trains no further (stop_after=0, or n_outer already reached) still
        # writes its checkpoint: the earlier run under the new config (e.g. another sampler)
        rank_states = gather_rank_states(state)
        if rank == 0:
            save_checkpoint(state, config, out, rank_states)
    check_ranks_in_sync(state.model)
    return state


def refill_sampler_config(config: IDEMConfig) -> IDEMConfig:
    """The config the buffer refills sample with: ``config`` with its ``refill_diffusion_scale``
    as the noise scale, where one is set (evaluations keep ``diffusion_scale``)."""
    if config.refill_diffusion_scale is None:
        return config
    return replace(config, diffusion_scale=config.refill_diffusion_scale)


def final_evaluation(out_dir: str | Path, n: int, progress: bool = True,
                     compile: bool | None = None) -> dict[str, float]:
    """Evaluate the checkpoint in ``out_dir`` on ``n`` fresh samples of its plain sampler (the
    number a shipped checkpoint's targets are checked on) against the whole reference set
    (:func:`evaluation_reference` with ``n=None``; recorded as ``"reference_samples"``); save
    them as ``samples.pt`` and the result as the run's last evaluation (``metrics.json`` and the
    checkpoint), marked with ``"n_samples"``. Seeded by the config and the outer iteration, like
    the evaluations during training, so the same checkpoint gives the same samples (``compile``,
    as for training, runs the network through torch.compile: float32 rounding only)."""
    out = Path(out_dir)
    payload = _load_payload(out)
    config = IDEMConfig(**payload["config"])
    if n < 2:
        raise TrainingConfigError(f"a final evaluation needs at least 2 samples, got {n}")
    sampler = _sampler_from_payload(payload)
    outer = payload["outer"]
    generator = torch.Generator().manual_seed(config.seed + 10_007 * outer + 1)
    forward = maybe_compiled(sampler.model, network_compiled(config, compile))
    with torch.no_grad():
        x = sampler.sample(n, generator, progress=progress, forward=forward)
    reference = evaluation_reference(config.target, None, torch.Generator().manual_seed(config.seed + 7))
    # x-W2 subsamples with its own seeded generator, so the metrics can be recomputed from the files
    metrics_gen = torch.Generator().manual_seed(config.seed)
    result = {"outer": float(outer), "energy_evaluations": float(payload["energy_evaluations"]),
              "n_samples": float(n), "reference_samples": float(reference.shape[0]),
              **evaluate_samples(sampler.energy, x, reference, metrics_gen)}
    # the checkpoint itself is edited (not reloaded as a run): this works for any process count
    payload["evaluations"] = [e for e in payload["evaluations"] if not (e["outer"] == outer and "n_samples" in e)]
    payload["evaluations"].append(result)
    torch.save(x.float().clone(), out / "samples.pt")
    write_run_files(payload, out)
    return result


# Moved into modules that import this one; still importable from here (PEP 562).
_MOVED = {
    "equal_budget_mcmc": "boltzlab.training.mcmc_baseline",
    "write_baseline": "boltzlab.training.mcmc_baseline",
    "current_baseline": "boltzlab.training.mcmc_baseline",
    "train_to_completion": "boltzlab.training.mcmc_baseline",
    "train_shipped": "boltzlab.training.mcmc_baseline",
    "main": "boltzlab.training.cli",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
