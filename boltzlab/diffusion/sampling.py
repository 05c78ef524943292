"""Sampling by running time backwards: the reverse SDE (its variance increments, the whole run
and one step written out) and the probability-flow ODE (its drift and a Heun integrator).
The updates are in :mod:`boltzlab.diffusion`'s docstring."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzlab.diffusion._checks import (
    DiffusionInputError,
    Projection,
    ScoreFn,
    _check_state,
    _check_steps,
    _identity,
)
from boltzlab.diffusion.schedule import GeometricNoiseSchedule

if TYPE_CHECKING:
    from boltzlab.energies import Energy


def _time_grid(n_steps: int, t_start: float, t_end: float, like: Tensor) -> Tensor:
    return torch.linspace(t_start, t_end, n_steps + 1, dtype=like.dtype, device=like.device)


SDE_INCREMENTS: tuple[str, ...] = ("exact", "euler")


def sde_variance_increments(schedule: GeometricNoiseSchedule, times: Tensor, increment: str = "exact") -> Tensor:
    """Delta_k, the variance each reverse-SDE step adds, for decreasing ``times`` (n + 1,) -> (n,).

    ``"exact"``: sigma^2(t_k) - sigma^2(t_{k+1}) (sums to sigma^2(t_0) - sigma^2(t_n) exactly);
    ``"euler"``: g(t_k)^2 (t_k - t_{k+1}). Computed in float64, returned in ``times``' dtype.
    """
    t = times.double()
    if increment == "exact":
        var = schedule.variance(t)
        out = var[:-1] - var[1:]
    elif increment == "euler":
        out = schedule.g2(t[:-1]) * (t[:-1] - t[1:])
    else:
        raise DiffusionInputError(f"unknown increment {increment!r}; use one of {', '.join(SDE_INCREMENTS)}")
    return out.to(times.dtype)


@torch.no_grad()
def reverse_sde_sample(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    x1: Tensor,
    n_steps: int,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
    t_end: float = 0.0,
    progress: bool = False,
    return_trajectory: bool = False,
    increment: str = "euler",
    diffusion_scale: float = 1.0,
    t_start: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """The reverse SDE from ``t_start`` (default 1) to ``t_end`` (:mod:`boltzlab.diffusion`'s
    docstring for the update).

    Args:
        score: s(x, t), (B, dim), (B,) -> (B, dim).
        x1: starting states at ``t_start``, (B, dim) (at t = 1: :func:`sample_prior`; at an
            earlier time: :func:`reverse_sde_from_data`).
        n_steps: equal steps of size dt = (t_start - t_end) / n_steps.
        project: projection applied to each noise draw and state (centre-of-mass removal).
        return_trajectory: also return the states at every step, (n_steps + 1, B, dim).
        increment: ``"euler"`` (Delta = g(t)^2 dt, Euler-Maruyama) or ``"exact"``
            (Delta = sigma_t^2 - sigma_{t-dt}^2). Same random numbers either way.
        diffusion_scale: multiplies the injected noise only, x += Delta s + c sqrt(Delta) z.
            c = 1 is the reverse SDE; c < 1 (the public iDEM code's ``diffusion_scale``: 0.9
            for LJ-13, 0.5 for LJ-55) no longer samples p_0: it is a colder, biased sampler
            whose samples sit deeper in the wells.

    Returns:
        x_{t_end} of shape (B, dim) (and the trajectory).
    """
    _check_steps(n_steps)
    if not (math.isfinite(diffusion_scale) and diffusion_scale >= 0):
        raise DiffusionInputError(f"diffusion_scale must be finite and >= 0, got {diffusion_scale}")
    if not (0.0 <= t_end < t_start <= 1.0):
        raise DiffusionInputError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    x = _check_state(x1, name="x1").clone()
    project = project or _identity
    times = _time_grid(n_steps, t_start, t_end, x)
    deltas = sde_variance_increments(schedule, times, increment)  # also rejects an unknown increment
    dt = (t_start - t_end) / n_steps
    trajectory = [x.clone()] if return_trajectory else []
    for k in tqdm(range(n_steps), desc="reverse SDE", disable=not progress, leave=False):
        t = times[k].expand(x.shape[0])
        z = project(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
        if diffusion_scale != 1.0:
            z = diffusion_scale * z
        if increment == "euler":
            # written as before the exact increment existed, so old runs reproduce bit for bit
            g2 = schedule.g2(t)[:, None]
            x = project(x + g2 * score(x, t) * dt + (g2 * dt).sqrt() * z)
        else:
            x = project(x + deltas[k] * score(x, t) + deltas[k].sqrt() * z)
        if return_trajectory:
            trajectory.append(x.clone())
    if return_trajectory:
        return x, torch.stack(trajectory)
    return x


def reverse_sde_from_data(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    x0: Tensor,
    sigma_start: float,
    n_steps: int,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
    increment: str = "euler",
    diffusion_scale: float = 1.0,
) -> Tensor:
    r"""Noise samples of the target to ``sigma_start`` and run the reverse SDE back to t = 0:
    (B, dim) -> (B, dim).

        x_s = x_0 + sigma_start * eps,   t_s = t(sigma_start),   then reverse SDE t_s -> 0

    in ``n_steps`` equal steps. If ``x0`` are exact samples of p_0, then x_s are exact samples
    of p_{t_s}, so with the exact score the output is distributed as p_0 again (up to the
    steps' discretisation) for every ``sigma_start``: whatever is wrong with the output was
    done by the score on sigma_t <= ``sigma_start`` alone. Repeated for increasing
    ``sigma_start``, it shows the noise band where a learned score goes wrong; unlike replacing
    the score by a Monte Carlo estimate there (:func:`score_with_mc_below`) it needs no energy
    evaluations, so it also works where no affordable estimate is accurate.
    ``x0`` (B, dim), e.g. a reference set; ``project`` as in :func:`reverse_sde_sample`.
    """
    x0 = _check_state(x0, name="x0")
    if not (math.isfinite(sigma_start) and sigma_start > 0):
        raise DiffusionInputError(f"sigma_start must be positive and finite, got {sigma_start}")
    t_start = float(schedule.time_at_std(torch.tensor(float(sigma_start), dtype=torch.float64)))
    if t_start > 1.0:
        raise DiffusionInputError(f"sigma_start {sigma_start} lies beyond the schedule's sigma_1 "
                                  f"{schedule.prior_std:.4g}")
    project = project or _identity
    eps = project(torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device))
    return reverse_sde_sample(score, schedule, project(x0 + sigma_start * eps), n_steps, project=project,
                              generator=generator, increment=increment, diffusion_scale=diffusion_scale,
                              t_start=t_start)


def pf_ode_drift(score: ScoreFn, schedule: GeometricNoiseSchedule, x: Tensor, t: Tensor) -> Tensor:
    """f(x, t) = -1/2 g(t)^2 s(x, t): dx/dt along the probability-flow ODE. Shapes as ``score``."""
    return -0.5 * schedule.g2(t)[:, None] * score(x, t)


@torch.no_grad()
def probability_flow_sample(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    x1: Tensor,
    n_steps: int,
    *,
    project: Projection | None = None,
    t_end: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """Integrate the probability-flow ODE from t = 1 to ``t_end`` with Heun's method (2nd order).

    Deterministic: the same ``x1`` always maps to the same sample. (B, dim) -> (B, dim).
    """
    _check_steps(n_steps)
    x = _check_state(x1, name="x1").clone()
    project = project or _identity
    times = _time_grid(n_steps, 1.0, t_end, x)
    for k in tqdm(range(n_steps), desc="probability-flow ODE", disable=not progress, leave=False):
        t0, t1 = times[k].expand(x.shape[0]), times[k + 1].expand(x.shape[0])
        h = times[k + 1] - times[k]
        f0 = pf_ode_drift(score, schedule, x, t0)
        x_pred = project(x + h * f0)
        f1 = pf_ode_drift(score, schedule, x_pred, t1)
        x = project(x + 0.5 * h * (f0 + f1))
    return x


def reverse_sde_step(score: ScoreFn, schedule: GeometricNoiseSchedule, x: Tensor, t: float, dt: float,
                     z: Tensor) -> Tensor:
    r"""One Euler-Maruyama step of the reverse SDE from time ``t`` to ``t - dt``:

        x_{t - dt} = x_t + g(t)^2 s(x_t, t) dt + g(t) sqrt(dt) z,    z ~ N(0, I),

    (the ``"euler"`` update of :func:`reverse_sde_sample`, written out for one step; the drift
    g^2 s has the sign that moves x toward higher density as time runs backwards).
    Shapes: ``x`` and ``z`` (B, dim) -> (B, dim); ``t`` in (0, 1], ``0 < dt <= t``.
    """
    x = _check_state(x, name="x")
    if not isinstance(z, Tensor) or z.shape != x.shape:
        raise DiffusionInputError(f"z must have the shape of x, {tuple(x.shape)}; got "
                                  f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    if not (0.0 < float(t) <= 1.0 and 0.0 < float(dt) <= float(t) + 1e-12):
        raise DiffusionInputError(f"need 0 < t <= 1 and 0 < dt <= t, got t={t}, dt={dt}")
    tt = torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
    g2 = schedule.g2(tt)[:, None]
    return x + g2 * score(x, tt) * dt + (g2 * dt).sqrt() * z


def score_with_mc_below(score: ScoreFn, energy: "Energy", schedule: GeometricNoiseSchedule, sigma_switch: float,
                        n_mc: int, *, max_norm: float | None = None,
                        generator: torch.Generator | None = None) -> ScoreFn:
    r"""A score function that is ``score`` where sigma_t >= ``sigma_switch`` and the Monte Carlo
    estimate of grad log p_t below (:func:`boltzlab.estimators.mc_score`, force form, K =
    ``n_mc`` copies, clipped at ``max_norm`` per particle): s(x (B, dim), t (B,)) -> (B, dim).

    A diagnostic, not a sampler: it spends ``n_mc`` energy evaluations per point and step
    below the switch. Sampling with it for several switch levels localises a learned score's
    error in noise level: if the samples become right once the estimate takes over below
    sigma_c, the network's error lives below sigma_c; what is left lives above. The estimate is
    computed in float64 (the copies' energies span many kT) and returned in x's dtype.
    """
    from boltzlab.estimators import mc_score
    from boltzlab.validation import check_positive_int

    if not (sigma_switch >= 0 and math.isfinite(sigma_switch)):
        raise DiffusionInputError(f"sigma_switch must be finite and >= 0, got {sigma_switch}")
    check_positive_int(n_mc, "n_mc", DiffusionInputError)

    def hybrid(x: Tensor, t: Tensor) -> Tensor:
        out = score(x, t)
        sigma = schedule.std(t)
        below = sigma < sigma_switch
        if bool(below.any()):
            out = out.clone()
            out[below] = mc_score(energy, x[below].double(), sigma[below].double(), n_mc, generator=generator,
                                  max_norm=max_norm).to(out.dtype)
        return out

    return hybrid
