"""The likelihood of a diffusion sampler: log q by the probability-flow ODE, with the exact
divergence or Hutchinson's estimator, optionally in the centre-of-mass-free subspace
(:mod:`boltzlab.importance`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzlab.diffusion import GeometricNoiseSchedule, pf_ode_drift
from boltzlab.importance.weights import ImportanceInputError, _positive_int

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Projection = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------------------
# likelihood of a diffusion sampler: the probability-flow ODE
# ----------------------------------------------------------------------------------------


def _projection_rank(project: Projection, dim: int, like: Tensor) -> float:
    """tr P for a linear orthogonal projection P given as a function (rows of I_dim mapped)."""
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return float(torch.diagonal(project(eye)).sum())


def _probe(shape: torch.Size, like: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, device=like.device).to(like.dtype) * 2 - 1
    else:
        v = torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
    return v


def _drift_and_divergence(drift: Callable[[Tensor], Tensor], x: Tensor, divergence: str, n_probes: int,
                          probe: str, project: Projection | None,
                          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """f(x) ``(B, dim)`` and div f(x) ``(B,)``: exact (one backward pass per dimension) or
    Hutchinson's tr J ≈ (1/K) Σ_k v_k^T J v_k with E[v v^T] = I (or P on a subspace)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        f = drift(xg)
        div = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        if divergence == "exact":
            dim = x.shape[1]
            for i in range(dim):
                (grad,) = torch.autograd.grad(f[:, i].sum(), xg, retain_graph=i < dim - 1)
                div += grad[:, i].to(torch.float64)
        else:
            for k in range(n_probes):
                v = _probe(x.shape, x, probe, generator)
                if project is not None:
                    v = project(v)
                (vjp,) = torch.autograd.grad(f, xg, grad_outputs=v, retain_graph=k < n_probes - 1)
                div += (vjp * v).sum(-1).to(torch.float64)
            div /= n_probes
    return f.detach(), div


def pf_ode_log_prob(
    score: ScoreFn,
    schedule: GeometricNoiseSchedule,
    x0: Tensor,
    n_steps: int,
    *,
    divergence: str = "exact",
    n_probes: int = 1,
    probe: str = "rademacher",
    project: Projection | None = None,
    generator: torch.Generator | None = None,
    effective_dim: int | None = None,
    t_start: float = 0.0,
    batch_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    r"""log q(x_0) of the probability-flow sampler, by the instantaneous change of variables.

    The probability-flow ODE dx/dt = f(x, t) = -½ g(t)² s(x, t) transports the prior
    N(0, σ_1² I) at t = 1 into the sampler's output at t = 0 (:func:`boltzlab.diffusion.
    probability_flow_sample`). Along any solution, d/dt log q_t(x_t) = -div f(x_t, t), so
    integrating forward from the sample x_0 at t = 0 to x_1 at t = 1,

        log q(x_0) = log N(x_1; 0, σ_1² I_{d_eff}) + ∫_0^1 div f(x_t, t) dt.

    The state and the integral are advanced together with Heun's method (trapezoid rule
    for the integral) on ``n_steps`` equal steps from ``t_start`` (default 0: σ_0 = 0 exactly
    for the geometric schedule, so nothing is singular there; with ``t_start`` > 0 the result
    is the log-density of the noised output at that time). Only the divergence needs
    autograd; the state update is without gradients.

    Args:
        score: s(x, t), ``(B, dim), (B,) -> (B, dim)``; rows must be independent (no batch norm).
        schedule: the noise schedule the sampler used.
        x0: samples ``(B, dim)``, e.g. from ``probability_flow_sample`` (the density of
            reverse-SDE samples is a different one unless the score is exact).
        n_steps: Heun steps (each costs two drift evaluations with their divergence).
        divergence: ``"exact"``, tr ∂f/∂x with one backward pass per coordinate (small dim), or
            ``"hutchinson"``: (1/K) Σ_k v_kᵀ (∂f/∂x) v_k with K = ``n_probes`` fresh probes per
            evaluation (``probe`` = ``"rademacher"`` or ``"gaussian"``), unbiased, with a
            variance that the number of probes and steps averages down.
        project: for particle systems, the centre-of-mass projection P. The density then
            lives on the (n-1)·d-dimensional subspace: the drift is evaluated as
            P f(P x) and probes are projected, so the divergence is tr(P J P), the
            divergence within the subspace (for a projected drift, tr(P J P) = tr(J P) =
            tr(J): the full-space divergence of P f equals the subspace one), and the prior
            uses d_eff = tr P.
        effective_dim: d_eff of the prior; default ``dim`` (or tr P with ``project``). A value
            that contradicts tr P raises.
        batch_size: process ``x0`` in chunks of this many rows (memory).

    Returns:
        log q(x_0), ``(B,)`` float64, with respect to Lebesgue measure on the subspace.
    """
    if not callable(score):
        raise ImportanceInputError(f"score must be a callable s(x, t), got {type(score).__name__}")
    if not isinstance(schedule, GeometricNoiseSchedule):
        raise ImportanceInputError(f"schedule must be a GeometricNoiseSchedule, got {type(schedule).__name__}")
    if not isinstance(x0, Tensor) or x0.ndim != 2 or not x0.is_floating_point() or x0.shape[0] == 0:
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ImportanceInputError(f"x0: expected a floating tensor of shape (B, dim) with B >= 1, got {shape}")
    bad = ~torch.isfinite(x0).all(dim=1)
    if bool(bad.any()):
        raise ImportanceInputError(f"x0: {int(bad.sum())} of {x0.shape[0]} samples contain NaN or inf coordinates")
    n_steps = _positive_int(n_steps, "n_steps")
    if divergence not in ("exact", "hutchinson"):
        raise ImportanceInputError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    n_probes = _positive_int(n_probes, "n_probes")
    if probe not in ("rademacher", "gaussian"):
        raise ImportanceInputError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")
    if project is not None and not callable(project):
        raise ImportanceInputError(f"project must be callable or None, got {type(project).__name__}")
    if not (isinstance(t_start, (int, float)) and 0.0 <= t_start < 1.0):
        raise ImportanceInputError(f"t_start must lie in [0, 1), got {t_start!r}")
    x0 = x0.detach()
    dim = x0.shape[1]
    d_eff = dim
    if project is not None:
        rank = _projection_rank(project, dim, x0)
        d_eff = round(rank)
        if abs(rank - d_eff) > 1e-3:
            raise ImportanceInputError(f"project is not an orthogonal projection: tr P = {rank:.4f} is not an integer")
        off = float((project(x0) - x0).abs().max())
        scale = float(x0.abs().max()) + 1.0
        if off > 1e-4 * scale:
            raise ImportanceInputError(f"x0 does not lie in the subspace of project: max |P x0 - x0| = {off:.3g}; "
                                       f"project the samples first (e.g. remove the centre of mass)")
    if effective_dim is not None:
        _positive_int(effective_dim, "effective_dim")
        if effective_dim != d_eff:
            raise ImportanceInputError(
                f"effective_dim = {effective_dim} contradicts the {'projection (tr P' if project else 'dimension (dim'} "
                f"= {d_eff}); the prior density must use the dimension the samples live in"
            )
    batch_size = x0.shape[0] if batch_size is None else _positive_int(batch_size, "batch_size")
    chunks = [_pf_ode_chunk(score, schedule, xb, n_steps, divergence, n_probes, probe, project, generator, d_eff,
                            float(t_start), progress)
              for xb in x0.split(batch_size)]
    return torch.cat(chunks)


@torch.no_grad()
def _pf_ode_chunk(score: ScoreFn, schedule: GeometricNoiseSchedule, x0: Tensor, n_steps: int, divergence: str,
                  n_probes: int, probe: str, project: Projection | None, generator: torch.Generator | None,
                  d_eff: int, t_start: float, progress: bool) -> Tensor:
    proj = project if project is not None else (lambda v: v)
    batch, dim = x0.shape

    def drift_at(t: Tensor) -> Callable[[Tensor], Tensor]:
        def drift(x: Tensor) -> Tensor:
            out = proj(pf_ode_drift(score, schedule, proj(x), t))
            if not isinstance(out, Tensor) or out.shape != (batch, dim):
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ImportanceInputError(f"score(x, t) returned shape {shape}, expected ({batch}, {dim})")
            return out
        return drift

    times = torch.linspace(t_start, 1.0, n_steps + 1, dtype=torch.float64)
    x = x0.clone()
    integral = torch.zeros(batch, dtype=torch.float64, device=x0.device)
    for k in tqdm(range(n_steps), desc="probability-flow likelihood", disable=not progress, leave=False):
        h = float(times[k + 1] - times[k])
        t0 = times[k].to(x.dtype).expand(batch).to(x.device)
        t1 = times[k + 1].to(x.dtype).expand(batch).to(x.device)
        f0, d0 = _drift_and_divergence(drift_at(t0), x, divergence, n_probes, probe, project, generator)
        x_pred = proj(x + h * f0)
        f1, d1 = _drift_and_divergence(drift_at(t1), x_pred, divergence, n_probes, probe, project, generator)
        x = proj(x + 0.5 * h * (f0 + f1))
        integral += 0.5 * h * (d0 + d1)
        if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(integral).all())):
            raise ImportanceInputError(f"the probability-flow ODE diverged at step {k + 1} of {n_steps} "
                                       f"(t = {float(times[k + 1]):.4g}): the score returned NaN or inf")
    sigma1 = schedule.prior_std
    x1 = x.to(torch.float64)
    log_prior = -0.5 * x1.pow(2).sum(-1) / sigma1**2 - 0.5 * d_eff * math.log(2 * math.pi * sigma1**2)
    return log_prior + integral
