r"""Markov chain Monte Carlo over many chains at once, and its diagnostics.

Kernels (each targets p(x) ∝ exp(-E(x)/kT) for any :class:`boltzlab.energies.Energy`):

- **Random-walk Metropolis (RWM)**: propose y = x + σ ξ, ξ ~ N(0, I); accept with
  probability min(1, exp(-(E(y) - E(x))/kT)).
- **MALA** (Metropolis-adjusted Langevin): one Euler step of Langevin dynamics with time
  step τ, y = x + τ F(x)/kT + sqrt(2τ) ξ with F = -∇E, corrected by Metropolis-Hastings,

      log α = -(E(y) - E(x))/kT + log q(x | y) - log q(y | x),
      log q(y | x) = -|y - x - τ F(x)/kT|^2 / (4τ) + const.

- **Parallel tempering** (replica exchange): replicas at a geometric ladder
  kT_0 < kT_1 < ... < kT_{K-1} each take a MALA or RWM move; then neighbouring replicas
  (k, k+1) swap configurations with probability
  min(1, exp((1/kT_k - 1/kT_{k+1}) (E_k - E_{k+1}))). Only the kT_0 replica is kept.

Shapes: a batch of chains is ``(n_chains, dim)``; parallel tempering holds
``(n_temps, n_chains, dim)``. Step sizes are per chain (or per temperature) tensors.

Particle systems (``energy.is_particle_system``) are sampled in the centre-of-mass-free
subspace: start points, noise and proposals are projected with
:func:`boltzlab.energies.remove_com`. The projected noise P ξ is a standard normal *within*
the (n - 1) d dimensional subspace, the forces of translation-invariant energies already
lie in it (they are projected anyway, which makes the kernel target the restriction of
p to the subspace for any energy), so y - x - τ F/kT lies in the subspace and the MALA
proposal density there is the Gaussian above with the same squared norm: the
Metropolis-Hastings ratio needs no change.

Step sizes adapt during burn-in only, by a Robbins-Monro step on their logarithm,
log s <- log s + γ_t (α - α*), γ_t = (t + 10)^-0.6, toward a target acceptance α*
(0.574 for MALA, 0.234 for RWM); they are frozen afterwards, so the kept part of every
chain is a time-homogeneous Markov chain that leaves p invariant.

Diagnostics: :func:`rhat` (split Gelman-Rubin), :func:`integrated_autocorrelation_time`
(FFT autocovariances pooled over chains; Geyer's initial monotone sequence or Sokal's window),
:func:`effective_sample_size` and :func:`monte_carlo_standard_error`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzlab.energies import Energy, remove_com

Kernel = Literal["mala", "rwm"]

_FFT_CHUNK_CHAINS = 16

TARGET_ACCEPTANCE: dict[str, float] = {"mala": 0.574, "rwm": 0.234}
"""Asymptotically optimal acceptance rates (Roberts & Rosenthal) used as adaptation targets."""


# ----------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------


@dataclass
class MCMCResult:
    """What a run returns.

    Attributes:
        samples: kept configurations, ``(n_kept, n_chains, dim)``; for parallel tempering
            those of the lowest temperature only.
        energies: E of every kept sample, ``(n_kept, n_chains)``.
        energy_trace: E at every step (burn-in included) of every chain, ``(n_steps, n_chains)``,
            or ``None`` when not recorded. Use it for stationarity checks and the IAT in steps.
        acceptance: post-burn-in acceptance rate, ``(n_chains,)``; ``(n_temps, n_chains)`` for
            parallel tempering.
        step_size: the frozen step sizes, same shape as ``acceptance`` (σ for RWM, τ for MALA).
        kernel: ``"mala"`` or ``"rwm"``.
        n_steps, burn_in, thin: the schedule; sample k was taken after step burn_in + (k+1) thin.
        n_energy_evaluations: configurations whose energy (and forces, for MALA) were computed.
        wall_time: seconds.
        kT: the temperature of the kept samples, or the ladder ``(n_temps,)`` for parallel tempering.
        swap_acceptance: post-burn-in swap acceptance of each neighbour pair, ``(n_temps - 1,)``
            (parallel tempering only).
        final_state: the last configuration of every chain (all replicas for parallel
            tempering), to continue a run.
    """

    samples: Tensor
    energies: Tensor
    energy_trace: Tensor | None
    acceptance: Tensor
    step_size: Tensor
    kernel: str
    n_steps: int
    burn_in: int
    thin: int
    n_energy_evaluations: int
    wall_time: float
    kT: Tensor
    final_state: Tensor
    swap_acceptance: Tensor | None = None


# ----------------------------------------------------------------------------------------
# Single moves on cached state
# ----------------------------------------------------------------------------------------


def _project(energy: Energy, v: Tensor) -> Tensor:
    """Remove the centre of mass for particle systems; identity otherwise."""
    if energy.is_particle_system:
        return remove_com(v, int(energy.n_particles), int(energy.spatial_dim))  # type: ignore[arg-type]
    return v


def _noise(energy: Energy, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """ξ ~ N(0, I) in the sampler's space (the COM-free subspace for particles), shape of ``like``."""
    xi = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return _project(energy, xi)


def _log_uniform(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    return torch.log(u)


def _evaluate(energy: Energy, x: Tensor, with_forces: bool) -> tuple[Tensor, Tensor | None]:
    if with_forces:
        e, f = energy.energy_and_forces(x)
        return e, _project(energy, f)
    return energy.energy(x), None


def _guard_finite(x_new: Tensor, x_old: Tensor) -> tuple[Tensor, Tensor]:
    """Replace non-finite proposals (overflow from a huge force) by the current point; return
    the mask of good proposals so the bad ones are rejected."""
    ok = torch.isfinite(x_new).all(dim=-1)
    if bool(ok.all()):
        return x_new, ok
    return torch.where(ok.unsqueeze(-1), x_new, x_old), ok


def _accept(
    log_alpha: Tensor, ok: Tensor, x: Tensor, e: Tensor, f: Tensor | None,
    y: Tensor, e_y: Tensor, f_y: Tensor | None, generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
    """Metropolis decision. Returns (x, e, f, accepted, acceptance probability)."""
    log_alpha = torch.where(ok & ~torch.isnan(log_alpha), log_alpha, torch.full_like(log_alpha, -math.inf))
    accepted = _log_uniform(log_alpha.shape, log_alpha, generator) < log_alpha
    a = accepted.unsqueeze(-1)
    x = torch.where(a, y, x)
    e = torch.where(accepted, e_y, e)
    if f is not None and f_y is not None:
        f = torch.where(a, f_y, f)
    return x, e, f, accepted, log_alpha.clamp(max=0.0).exp()


def _rwm_move(
    energy: Energy, x: Tensor, e: Tensor, sigma: Tensor, kT: Tensor, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One RWM move on a batch ``x`` of shape ``(..., dim)`` with cached energies ``e`` ``(...)``;
    ``sigma`` and ``kT`` broadcast to ``(...)``. Returns (x, e, accepted, acceptance probability)."""
    y = _project(energy, x + sigma.unsqueeze(-1) * _noise(energy, x, generator))
    y, ok = _guard_finite(y, x)
    e_y = energy.energy(y)
    log_alpha = -(e_y - e) / kT
    x, e, _, accepted, prob = _accept(log_alpha, ok, x, e, None, y, e_y, None, generator)
    return x, e, accepted, prob


def _mala_move(
    energy: Energy, x: Tensor, e: Tensor, f: Tensor, tau: Tensor, kT: Tensor,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One MALA move with cached energies ``e`` ``(...)`` and (projected) forces ``f`` ``(..., dim)``.
    Returns (x, e, f, accepted, acceptance probability)."""
    tau_ = tau.unsqueeze(-1)
    kT_ = kT.unsqueeze(-1)
    mean_fwd = x + tau_ * f / kT_
    y = _project(energy, mean_fwd + torch.sqrt(2 * tau_) * _noise(energy, x, generator))
    y, ok = _guard_finite(y, x)
    e_y, f_y = _evaluate(energy, y, with_forces=True)
    assert f_y is not None
    mean_bwd = y + tau_ * f_y / kT_
    log_q_fwd = -((y - mean_fwd) ** 2).sum(-1) / (4 * tau)
    log_q_bwd = -((x - mean_bwd) ** 2).sum(-1) / (4 * tau)
    log_alpha = -(e_y - e) / kT + log_q_bwd - log_q_fwd
    x, e, f_new, accepted, prob = _accept(log_alpha, ok, x, e, f, y, e_y, f_y, generator)
    assert f_new is not None
    return x, e, f_new, accepted, prob


def _swap_move(
    x: Tensor, e: Tensor, f: Tensor | None, kT: Tensor, parity: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Attempt swaps between replicas (k, k+1) for every k ≡ parity (mod 2).

    ``x`` ``(K, C, dim)``, ``e`` ``(K, C)``, ``kT`` ``(K,)``. Returns (x, e, f, accepted) with
    ``accepted`` of shape ``(K - 1, C)`` (False for pairs not attempted)."""
    n_temps = x.shape[0]
    lower = torch.arange(parity, n_temps - 1, 2, device=x.device)
    accepted = torch.zeros(n_temps - 1, x.shape[1], dtype=torch.bool, device=x.device)
    if lower.numel() == 0:
        return x, e, f, accepted
    beta = 1.0 / kT
    log_alpha = (beta[lower] - beta[lower + 1]).unsqueeze(-1) * (e[lower] - e[lower + 1])
    acc = _log_uniform(log_alpha.shape, log_alpha, generator) < log_alpha  # (P, C)
    accepted[lower] = acc
    source = torch.arange(n_temps, device=x.device).unsqueeze(-1).expand(n_temps, x.shape[1]).clone()
    source[lower] = torch.where(acc, lower.unsqueeze(-1) + 1, lower.unsqueeze(-1))
    source[lower + 1] = torch.where(acc, lower.unsqueeze(-1), lower.unsqueeze(-1) + 1)
    idx = source.unsqueeze(-1).expand_as(x)
    x = torch.gather(x, 0, idx)
    e = torch.gather(e, 0, source)
    if f is not None:
        f = torch.gather(f, 0, idx)
    return x, e, f, accepted


# ----------------------------------------------------------------------------------------
# Public single steps (the chapter and the exercises use these)
# ----------------------------------------------------------------------------------------


def _as_batch_tensor(value: float | Tensor, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return t.expand(like.shape[:-1])


def rwm_step(
    energy: Energy, x: Tensor, step_size: float | Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One random-walk Metropolis step at ``energy.kT`` for a batch ``x`` ``(..., dim)``.

    y = x + σ ξ; accept with probability min(1, exp(-(E(y) - E(x))/kT)). ``step_size`` σ is a
    float or broadcasts to ``(...)``. Returns (x_new ``(..., dim)``, accepted ``(...)`` bool)."""
    x = _project(energy, energy.check_input(x))
    sigma = _as_batch_tensor(step_size, x, "step_size")
    kT = torch.full(x.shape[:-1], energy.kT, dtype=x.dtype, device=x.device)
    x_new, _, accepted, _ = _rwm_move(energy, x, energy.energy(x), sigma, kT, generator)
    return x_new, accepted


def mala_step(
    energy: Energy, x: Tensor, step_size: float | Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One MALA step at ``energy.kT`` for a batch ``x`` ``(..., dim)``.

    y = x + τ F(x)/kT + sqrt(2τ) ξ, accepted with probability
    min(1, exp(-(E(y) - E(x))/kT) q(x|y) / q(y|x)), q(y|x) ∝ exp(-|y - x - τF(x)/kT|^2 / 4τ).
    ``step_size`` τ is a float or broadcasts to ``(...)``.
    Returns (x_new ``(..., dim)``, accepted ``(...)`` bool)."""
    x = _project(energy, energy.check_input(x))
    tau = _as_batch_tensor(step_size, x, "step_size")
    kT = torch.full(x.shape[:-1], energy.kT, dtype=x.dtype, device=x.device)
    e, f = _evaluate(energy, x, with_forces=True)
    assert f is not None
    x_new, _, _, accepted, _ = _mala_move(energy, x, e, f, tau, kT, generator)
    return x_new, accepted


def replica_swap_step(
    energy: Energy, x: Tensor, kT: Tensor, parity: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One round of replica-exchange swaps between neighbours (k, k+1), k ≡ ``parity`` (mod 2).

    ``x`` ``(n_temps, n_chains, dim)``, ``kT`` ``(n_temps,)`` increasing. The swap of replicas k
    and k+1 is accepted with probability min(1, exp((1/kT_k - 1/kT_{k+1}) (E_k - E_{k+1}))).
    Returns (x_new, accepted ``(n_temps - 1, n_chains)``)."""
    x = energy.check_input(x)
    if x.ndim != 3 or kT.shape != (x.shape[0],):
        raise ValueError(
            f"expected x (n_temps, n_chains, dim) and kT (n_temps,), got {tuple(x.shape)} and {tuple(kT.shape)}"
        )
    x_new, _, _, accepted = _swap_move(x, energy.energy(x), None, kT.to(x), parity % 2, generator)
    return x_new, accepted


# ----------------------------------------------------------------------------------------
# Drivers
# ----------------------------------------------------------------------------------------


def geometric_ladder(kT_min: float, kT_max: float, n_temps: int) -> Tensor:
    """kT_k = kT_min (kT_max / kT_min)^(k / (n_temps - 1)), k = 0..n_temps-1; float64 ``(n_temps,)``."""
    if n_temps < 2:
        raise ValueError(f"parallel tempering needs n_temps >= 2, got {n_temps}")
    if not (0 < kT_min < kT_max) or not math.isfinite(kT_max):
        raise ValueError(f"need 0 < kT_min < kT_max < inf, got kT_min={kT_min}, kT_max={kT_max}")
    k = torch.arange(n_temps, dtype=torch.float64)
    return kT_min * (kT_max / kT_min) ** (k / (n_temps - 1))


def _check_schedule(n_steps: int, burn_in: int, thin: int) -> None:
    if n_steps < 1 or burn_in < 0 or thin < 1:
        raise ValueError(f"need n_steps >= 1, burn_in >= 0, thin >= 1; got {n_steps}, {burn_in}, {thin}")
    if n_steps - burn_in < thin:
        raise ValueError(
            f"nothing would be kept: n_steps - burn_in = {n_steps - burn_in} is less than thin = {thin}"
        )


def _adapt_rate(t: int) -> float:
    """Robbins-Monro gain γ_t = (t + 10)^-0.6: sum diverges, sum of squares converges."""
    return (t + 10.0) ** -0.6


def _run(
    energy: Energy, x: Tensor, kT_ladder: Tensor | None, n_steps: int, kernel: Kernel,
    step_size: float | Tensor, burn_in: int, thin: int, adapt: bool, adapt_per_chain: bool,
    target_acceptance: float | None, swap_every: int, generator: torch.Generator | None,
    progress: bool, keep_energy_trace: bool,
) -> MCMCResult:
    """Shared loop. Without a ladder ``x`` is ``(C, dim)``; with one it is ``(K, C, dim)``."""
    if kernel not in TARGET_ACCEPTANCE:
        raise ValueError(f"unknown kernel {kernel!r}; use 'mala' or 'rwm'")
    _check_schedule(n_steps, burn_in, thin)
    target = TARGET_ACCEPTANCE[kernel] if target_acceptance is None else float(target_acceptance)
    if not 0 < target < 1:
        raise ValueError(f"target_acceptance must lie in (0, 1), got {target}")
    tempering = kT_ladder is not None
    batch = x.shape[:-1]
    ladder = kT_ladder.to(x) if kT_ladder is not None else None
    if ladder is not None:
        kT = ladder.unsqueeze(-1).expand(batch)
    else:
        kT = torch.full(batch, energy.kT, dtype=x.dtype, device=x.device)

    s = torch.as_tensor(step_size, dtype=x.dtype, device=x.device)
    if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
        raise ValueError(f"step_size must be positive and finite, got {step_size}")
    if tempering and s.ndim == 0:
        # hotter replicas need bigger steps: MALA's τ scales like kT, RWM's σ like sqrt(kT)
        s = s * (kT / kT[0]) ** (1.0 if kernel == "mala" else 0.5)
    log_s = torch.log(s.expand(batch)).clone()

    x = _project(energy, x)
    e, f = _evaluate(energy, x, with_forces=kernel == "mala")
    n_kept = (n_steps - burn_in) // thin
    chains = batch[-1]
    samples = torch.empty(n_kept, chains, x.shape[-1], dtype=x.dtype, device=x.device)
    kept_energies = torch.empty(n_kept, chains, dtype=x.dtype, device=x.device)
    trace = torch.empty(n_steps, chains, dtype=x.dtype, device=x.device) if keep_energy_trace else None
    n_accepted = torch.zeros(batch, dtype=torch.float64, device=x.device)
    n_swaps = torch.zeros(max(batch[0] - 1, 0) if tempering else 0, dtype=torch.float64, device=x.device)
    n_swap_tries = torch.zeros_like(n_swaps)
    n_evals = int(np.prod(batch))
    swap_round = 0
    start = time.perf_counter()

    bar = tqdm(range(n_steps), desc=f"{'PT-' if tempering else ''}{kernel.upper()} {energy.name}",
               disable=not progress, mininterval=1.0)
    for t in bar:
        step = log_s.exp()
        if kernel == "mala":
            assert f is not None
            x, e, f, accepted, prob = _mala_move(energy, x, e, f, step, kT, generator)
        else:
            x, e, accepted, prob = _rwm_move(energy, x, e, step, kT, generator)
        n_evals += int(np.prod(batch))

        if t < burn_in and adapt:
            # per temperature (or per chain): average the acceptance probability over chains
            signal = prob if adapt_per_chain else prob.mean(dim=-1, keepdim=True).expand_as(prob)
            log_s = log_s + _adapt_rate(t) * (signal - target)
        elif t >= burn_in:
            n_accepted += accepted

        if ladder is not None and (t + 1) % swap_every == 0:
            x, e, f, swapped = _swap_move(x, e, f, ladder, swap_round % 2, generator)
            if t >= burn_in:
                tried = torch.zeros_like(n_swap_tries)
                tried[swap_round % 2::2] = chains
                n_swap_tries += tried
                n_swaps += swapped.sum(-1)
            swap_round += 1

        e_kept = e[0] if tempering else e
        if trace is not None:
            trace[t] = e_kept
        if t >= burn_in and (t + 1 - burn_in) % thin == 0:
            k = (t + 1 - burn_in) // thin - 1
            if k < n_kept:
                samples[k] = x[0] if tempering else x
                kept_energies[k] = e_kept
        if progress and t % 200 == 0:
            bar.set_postfix(acc=f"{float(prob.mean()):.2f}", E=f"{float(e_kept.mean()):.3g}")

    n_post = n_steps - burn_in
    return MCMCResult(
        samples=samples,
        energies=kept_energies,
        energy_trace=trace,
        acceptance=(n_accepted / n_post).to(x.dtype),
        step_size=log_s.exp(),
        kernel=kernel,
        n_steps=n_steps,
        burn_in=burn_in,
        thin=thin,
        n_energy_evaluations=n_evals,
        wall_time=time.perf_counter() - start,
        kT=kT_ladder.clone() if kT_ladder is not None else torch.tensor(energy.kT, dtype=torch.float64),
        final_state=x,
        swap_acceptance=(n_swaps / n_swap_tries.clamp(min=1)) if tempering else None,
    )


def _check_start(energy: Energy, x0: Tensor, ndim: tuple[int, ...]) -> Tensor:
    x0 = energy.check_input(x0)
    if x0.ndim not in ndim:
        shapes = " or ".join({2: "(n_chains, dim)", 3: "(n_temps, n_chains, dim)"}[n] for n in ndim)
        raise ValueError(f"start points must have shape {shapes}, got {tuple(x0.shape)}")
    return x0.clone()


def run_mcmc(
    energy: Energy,
    x0: Tensor,
    n_steps: int,
    kernel: Kernel = "mala",
    step_size: float | Tensor = 0.01,
    burn_in: int = 0,
    thin: int = 1,
    adapt: bool = True,
    adapt_per_chain: bool = True,
    target_acceptance: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    keep_energy_trace: bool = True,
) -> MCMCResult:
    """Run ``n_chains`` MALA or RWM chains at ``energy.kT`` from ``x0`` ``(n_chains, dim)``.

    ``step_size`` (τ for MALA, σ for RWM) is a float or a ``(n_chains,)`` tensor; it adapts
    toward ``target_acceptance`` (default 0.574 MALA, 0.234 RWM) during the first ``burn_in``
    steps when ``adapt`` (per chain, or shared by all chains when ``adapt_per_chain`` is
    False) and is frozen afterwards. Every ``thin``-th post-burn-in state is kept:
    ``samples`` is ``((n_steps - burn_in) // thin, n_chains, dim)``. The dtype and device
    are those of ``x0`` (float64 recommended for long runs).
    """
    x0 = _check_start(energy, x0, (2,))
    return _run(energy, x0, None, n_steps, kernel, step_size, burn_in, thin, adapt, adapt_per_chain,
                target_acceptance, 1, generator, progress, keep_energy_trace)


def mala_refine(energy: Energy, x: Tensor, n_steps: int, generator: torch.Generator | None = None,
                step_size: float = 1e-3) -> Tensor:
    """Move every state of ``x`` ``(n, dim)`` by ``n_steps`` MALA steps at ``energy.kT`` and return
    the last states ``(n, dim)`` (in float64 internally, ``x``'s dtype out).

    The step size starts at ``step_size`` and adapts per chain during the first half of the
    steps (:func:`run_mcmc`). States with an overlapping pair simply reject every move. Costs
    ``n * n_steps`` energy and force evaluations. Used to move iDEM's replay buffer towards p
    (``IDEMConfig.buffer_mala_steps``)."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
    burn_in = n_steps // 2 if n_steps > 1 else 0
    result = run_mcmc(energy, x.double(), n_steps, kernel="mala", step_size=step_size, burn_in=burn_in,
                      thin=n_steps - burn_in, generator=generator, progress=False, keep_energy_trace=False)
    return result.final_state.to(x.dtype)


def run_parallel_tempering(
    energy: Energy,
    x0: Tensor,
    n_steps: int,
    kT_max: float,
    n_temps: int = 8,
    kernel: Kernel = "mala",
    step_size: float | Tensor = 0.01,
    burn_in: int = 0,
    thin: int = 1,
    swap_every: int = 1,
    adapt: bool = True,
    adapt_per_chain: bool = False,
    target_acceptance: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    keep_energy_trace: bool = True,
) -> MCMCResult:
    """Parallel tempering: ``n_chains`` independent ladders of ``n_temps`` replicas at
    :func:`geometric_ladder` (energy.kT, kT_max, n_temps).

    ``x0`` is ``(n_chains, dim)`` (copied to every temperature) or ``(n_temps, n_chains, dim)``.
    Every step each replica makes one ``kernel`` move; every ``swap_every`` steps neighbours
    attempt swaps, even pairs (0,1), (2,3), ... and odd pairs (1,2), (3,4), ... in turn
    (each swap round leaves the joint distribution invariant). A scalar ``step_size`` is
    scaled up with temperature; step sizes adapt per temperature by default (the average
    acceptance over chains) during burn-in only. Only the kT_0 = energy.kT replica is
    kept: ``samples`` ``(n_kept, n_chains, dim)``; ``acceptance`` and ``step_size`` are
    ``(n_temps, n_chains)``, ``swap_acceptance`` ``(n_temps - 1,)``.
    """
    if swap_every < 1:
        raise ValueError(f"swap_every must be >= 1, got {swap_every}")
    ladder = geometric_ladder(energy.kT, kT_max, n_temps)
    x0 = _check_start(energy, x0, (2, 3))
    if x0.ndim == 2:
        x0 = x0.unsqueeze(0).expand(n_temps, *x0.shape).clone()
    elif x0.shape[0] != n_temps:
        raise ValueError(f"x0 has {x0.shape[0]} replicas but n_temps = {n_temps}")
    s = torch.as_tensor(step_size)
    if s.ndim == 1 and s.shape[0] == n_temps:
        step_size = s.unsqueeze(-1)  # one value per temperature
    return _run(energy, x0, ladder, n_steps, kernel, step_size, burn_in, thin, adapt, adapt_per_chain,
                target_acceptance, swap_every, generator, progress, keep_energy_trace)


# ----------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------


def _as_trace(trace: Tensor | np.ndarray, min_steps: int = 4) -> Tensor:
    """Validate a scalar trace: ``(n_steps, n_chains)`` (or ``(n_steps,)`` for one chain), float64."""
    t = torch.as_tensor(trace).detach().to("cpu", torch.float64)
    if t.ndim == 1:
        t = t.unsqueeze(-1)
    if t.ndim != 2:
        raise ValueError(f"expected a trace of shape (n_steps, n_chains), got {tuple(t.shape)}")
    if t.shape[0] < min_steps or t.shape[1] < 1:
        raise ValueError(f"trace too short: need at least {min_steps} steps and 1 chain, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("trace contains NaN or infinite values")
    return t


def rhat(trace: Tensor | np.ndarray) -> float:
    """Split R-hat (Gelman-Rubin) of a scalar over chains; ``trace`` ``(n_steps, n_chains)``.

    Each chain is split in halves, giving m chains of length n. With W the mean within-chain
    variance and B/n the variance of the chain means,
    R = sqrt(((n - 1)/n W + B/n) / W). About 1 for mixed chains; > 1.01 signals trouble.
    """
    t = _as_trace(trace)
    half = t.shape[0] // 2
    # drop the middle step of an odd trace so both halves have equal length
    split = torch.cat([t[:half], t[t.shape[0] - half:]], dim=1)
    n = split.shape[0]
    within = split.var(dim=0, unbiased=True).mean()
    between_over_n = split.mean(dim=0).var(unbiased=True)
    if float(within) == 0.0:
        raise ValueError("every chain is constant: R-hat is undefined")
    var_plus = (n - 1) / n * within + between_over_n
    return float(torch.sqrt(var_plus / within))


def autocorrelation(trace: Tensor | np.ndarray) -> Tensor:
    """Autocorrelation ρ(t), ``(n_steps,)``, of a scalar trace ``(n_steps, n_chains)``, pooled over chains.

    Each chain's autocovariance c_j(t) = (1/n) sum_s (x_s - x̄_j)(x_{s+t} - x̄_j) comes from an
    FFT (zero-padded against wrap-around). Chains are combined as in BDA3 / Stan,
    ρ(t) = 1 - (W - mean_j c_j(t)) / var⁺, with W the mean within-chain variance and
    var⁺ = (n-1)/n W + Var_j(x̄_j) the pooled variance: chains that disagree about the mean
    (not yet mixed) raise ρ at every lag instead of hiding it. ρ(0) is set to 1.
    """
    t = _as_trace(trace)
    n, m = t.shape
    n_fft = 1 << (2 * n - 1).bit_length()
    acov = torch.zeros(n, dtype=torch.float64)
    for chunk in torch.split(t, _FFT_CHUNK_CHAINS, dim=1):  # bounds memory for long traces
        centred = chunk - chunk.mean(dim=0, keepdim=True)
        spec = torch.fft.rfft(centred, n=n_fft, dim=0)
        acov += torch.fft.irfft(spec * spec.conj(), n=n_fft, dim=0)[:n].sum(dim=1)
    acov /= n * m
    within = acov[0] * n / (n - 1)
    var_plus = acov[0] + (t.mean(dim=0).var(unbiased=True) if m > 1 else 0.0)
    if float(var_plus) == 0.0:
        raise ValueError("trace has zero variance: the autocorrelation is undefined")
    rho = 1 - (within - acov) / var_plus
    rho[0] = 1.0
    return rho


def iat_from_autocorrelation(
    rho: Tensor, method: Literal["geyer", "sokal"] = "geyer", window_factor: float = 5.0
) -> float:
    """τ = 1 + 2 sum_{t>=1} ρ(t) from an autocorrelation sequence ``(n_lags,)`` with ρ(0) = 1,
    with the tail cut as described in :func:`integrated_autocorrelation_time`. Passing
    ``rho[::k]`` gives the IAT, in kept samples, of the chain thinned by k."""
    if method == "sokal":
        tau_m = 2 * torch.cumsum(rho, dim=0) - 1  # τ(M) for M = 0, 1, ...
        lags = torch.arange(rho.shape[0], dtype=rho.dtype)
        ok = lags >= window_factor * tau_m
        m = int(torch.nonzero(ok)[0]) if bool(ok.any()) else rho.shape[0] - 1
        return float(tau_m[m])
    if method != "geyer":
        raise ValueError(f"unknown method {method!r}; use 'geyer' or 'sokal'")
    if rho.shape[0] < 2:
        return 1.0
    pairs = rho[: rho.shape[0] // 2 * 2].reshape(-1, 2).sum(-1)
    negative = torch.nonzero(pairs < 0)
    if negative.numel():
        pairs = pairs[: int(negative[0])]
    monotone = torch.cummin(pairs, dim=0).values
    # τ >= 1/(2 n) always holds for a finite chain; the floor only guards an anticorrelated start
    return max(float(2 * monotone.sum() - 1), 1.0 / (2 * rho.shape[0]))


def integrated_autocorrelation_time(
    trace: Tensor | np.ndarray, method: Literal["geyer", "sokal"] = "geyer", window_factor: float = 5.0
) -> float:
    """Integrated autocorrelation time τ = 1 + 2 sum_{t>=1} ρ(t), in steps, of ``(n_steps, n_chains)``.

    ρ is :func:`autocorrelation`. The noisy tail of the sum is cut automatically:

    - ``"geyer"`` (default): Geyer's initial monotone sequence. The pair sums
      Γ_k = ρ(2k) + ρ(2k+1) of a reversible chain are positive and decreasing; sum them up
      to the first negative one, each capped by its predecessor; τ = 2 sum_k Γ_k - 1.
      Robust to slowly decaying tails (several time scales).
    - ``"sokal"``: the smallest window M with M >= ``window_factor`` · τ(M),
      τ(M) = 1 + 2 sum_{t=1}^{M} ρ(t). Lower variance, but it cuts off a long tail.

    If the trace is too short for either rule to stop, the estimate at the largest lag is a
    lower bound. An AR(1) process x_t = φ x_{t-1} + noise has τ = (1+φ)/(1-φ).
    """
    return iat_from_autocorrelation(autocorrelation(trace), method, window_factor)


def effective_sample_size(trace: Tensor | np.ndarray) -> float:
    """ESS = n_steps · n_chains / τ for a scalar trace ``(n_steps, n_chains)``."""
    t = _as_trace(trace)
    return t.numel() / integrated_autocorrelation_time(t)


def monte_carlo_standard_error(trace: Tensor | np.ndarray) -> float:
    """Standard error of the overall mean of a scalar trace: sqrt(Var · τ / (n_steps · n_chains))."""
    t = _as_trace(trace)
    return math.sqrt(float(t.var()) / effective_sample_size(t))
