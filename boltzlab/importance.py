r"""Importance sampling: reweight a sampler's output to the Boltzmann distribution.

A sampler q (a flow, a diffusion sampler) proposes x_i ~ q; the target is
p(x) = exp(-E(x)/kT) / Z. With the log-weights

    log w_i = -E(x_i)/kT - log q(x_i),

Z = E_q[w], and any average under p is a self-normalised weighted average,
E_p[A] ≈ Σ_i w̄_i A(x_i) with w̄ = softmax(log w). Everything here works on log-weights
(never on w itself, which overflows), in float64.

=====================================  ======================================================
weights (from :mod:`boltzlab.metrics`)  :func:`self_normalized_weights`, :func:`kish_ess`,
                                        :func:`normalized_ess`, :func:`log_z_estimate`,
                                        :func:`log_z_error` (re-exported)
weights of a sampler                    :func:`sampler_log_weights`
log Z with a bootstrap interval         :func:`log_z_bootstrap` -> :class:`LogZBootstrap`
estimators on small subsamples          :func:`subsample_estimates`
resampling to (approximately) p         :func:`importance_resample`
free energies (units of kT)             :func:`fep_free_energy` (Zwanzig, forward/reverse),
                                        :func:`bar_free_energy` (Bennett acceptance ratio),
                                        :func:`state_free_energy_difference` (two regions of
                                        one reweighted sample) -> :class:`FreeEnergyEstimate`
likelihood of a diffusion sampler       :func:`pf_ode_log_prob` (probability-flow ODE, exact
                                        or Hutchinson divergence, centre-of-mass subspace)
=====================================  ======================================================

Conventions: free energies are in units of kT, ΔF = F_1 - F_0 = -log(Z_1 / Z_0), and the
reduced potentials are u_k(x) = E_k(x)/kT_k (or -log q(x) for a normalised sampler, whose
Z is 1). Bad input raises :class:`ImportanceInputError` (a ``ValueError``) naming the
problem: shapes, lengths, NaN or infinite energies, an unknown option.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from boltzlab.diffusion import GeometricNoiseSchedule, pf_ode_drift
from boltzlab.energies import Energy
from boltzlab.metrics import (
    MetricInputError,
    kish_ess,
    log_z_error,
    log_z_estimate,
    normalized_ess,
    self_normalized_weights,
)
from boltzlab.validation import check_positive_int

__all__ = [
    "FreeEnergyEstimate",
    "ImportanceInputError",
    "LogZBootstrap",
    "SubsampleEstimates",
    "bar_free_energy",
    "fep_free_energy",
    "importance_resample",
    "kish_ess",
    "log_z_bootstrap",
    "log_z_error",
    "log_z_estimate",
    "normalized_ess",
    "pf_ode_log_prob",
    "sampler_log_weights",
    "self_normalized_weights",
    "state_free_energy_difference",
    "subsample_estimates",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]
Projection = Callable[[Tensor], Tensor]


class ImportanceInputError(MetricInputError):
    """Raised for input an importance-sampling estimator cannot use honestly (a ``ValueError``)."""


# ----------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------


def _vector(values: object, name: str, what: str = "values") -> Tensor:
    """A float64 CPU vector of finite numbers; a clear error otherwise."""
    if not isinstance(values, Tensor):
        raise ImportanceInputError(f"{name}: expected a torch.Tensor, got {type(values).__name__}")
    if values.ndim != 1:
        raise ImportanceInputError(f"{name}: expected a 1-D tensor of {what}, got shape {tuple(values.shape)}")
    if values.numel() == 0:
        raise ImportanceInputError(f"{name}: no {what} (empty tensor)")
    v = values.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        n_nan = int(torch.isnan(v).sum())
        raise ImportanceInputError(
            f"{name}: {int(bad.sum())} of {v.numel()} {what} are not finite ({n_nan} NaN, "
            f"{int(bad.sum()) - n_nan} inf); the samples or energies that gave them need looking at "
            f"before any reweighting"
        )
    return v


def _positive_int(value: object, name: str) -> int:
    return check_positive_int(value, name, ImportanceInputError)


def _log_mean_exp(v: Tensor) -> Tensor:
    """log((1/n) Σ exp(v)) along the last dimension, without overflow."""
    return torch.logsumexp(v, dim=-1) - math.log(v.shape[-1])


def _log_mean_se(log_terms: Tensor) -> float:
    r"""Delta-method standard error of log((1/n) Σ exp(l_i)): with the Kish ESS of the terms,
    SE² = Var(t) / (n mean(t)²) = (n / ESS - 1) / (n - 1), t_i = exp(l_i); inf for n = 1."""
    n = log_terms.numel()
    if n < 2:
        return math.inf
    return math.sqrt(max(n / kish_ess(log_terms) - 1.0, 0.0) / (n - 1))


# ----------------------------------------------------------------------------------------
# importance weights of a sampler
# ----------------------------------------------------------------------------------------


def sampler_log_weights(energy: Energy, x: Tensor, log_q: Tensor, kT: float | None = None) -> Tensor:
    r"""log w_i = -E(x_i)/kT - log q(x_i) for samples x_i ~ q: ``(n, dim), (n,) -> (n,)`` float64.

    ``energy`` is a :class:`boltzlab.energies.Energy` (``energy.energy(x)`` gives E),
    ``log_q`` the sampler's normalised log-density of the same samples, ``kT`` the
    temperature of the target (default ``energy.kT``).

    Raises :class:`ImportanceInputError` if the shapes do not match, or if any energy or
    log q is NaN or infinite (the message says how many): such a sample means the sampler
    or the energy diverged there, which must be reported, not silently given weight zero.
    """
    if not isinstance(energy, Energy):
        raise ImportanceInputError(f"energy: expected a boltzlab Energy, got {type(energy).__name__}")
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != energy.dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ImportanceInputError(f"x: expected shape (n, {energy.dim}) for {energy.name}, got {shape}")
    if not isinstance(log_q, Tensor) or log_q.shape != (x.shape[0],):
        shape = tuple(log_q.shape) if isinstance(log_q, Tensor) else type(log_q).__name__
        raise ImportanceInputError(f"log_q: expected shape ({x.shape[0]},), one value per sample, got {shape}")
    kT = energy.kT if kT is None else kT
    if not (isinstance(kT, (int, float)) and math.isfinite(kT) and kT > 0):
        raise ImportanceInputError(f"kT must be a positive finite number, got {kT!r}")
    with torch.no_grad():
        e = energy.energy(x.detach()).to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(e)
    if bool(bad.any()):
        raise ImportanceInputError(
            f"{int(bad.sum())} of {e.numel()} energies are not finite ({int(torch.isnan(e).sum())} NaN); "
            f"first bad sample at index {int(bad.nonzero()[0])}. Report how many samples diverged and "
            f"reweight the others explicitly if that is what you want"
        )
    lq = _vector(log_q, "log_q", "log-densities")
    return -e / float(kT) - lq


# ----------------------------------------------------------------------------------------
# log Z with a bootstrap interval; estimators on small subsamples
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogZBootstrap:
    """log Ẑ = logsumexp(log w) - log n with its bootstrap standard error and percentile interval."""

    estimate: float  # log Ẑ from all n samples
    standard_error: float  # standard deviation of log Ẑ over bootstrap resamples
    low: float  # (1 - level)/2 quantile of the bootstrap replicates
    high: float  # (1 + level)/2 quantile
    level: float
    n_samples: int
    n_boot: int
    ess: float  # Kish ESS of the n weights

    def covers(self, value: float) -> bool:
        """Whether ``value`` lies in [low, high]."""
        return self.low <= value <= self.high


def log_z_bootstrap(log_w: Tensor, n_boot: int = 1000, generator: torch.Generator | None = None,
                    level: float = 0.95, chunk: int = 2_000_000) -> LogZBootstrap:
    r"""log Ẑ and its bootstrap error from log-weights ``(n,)``.

    Each of ``n_boot`` replicates draws n indices with replacement and recomputes
    log Ẑ* = logsumexp(log w[idx]) - log n; the standard error is the standard deviation of
    the replicates and the interval their (1 ∓ ``level``)/2 quantiles (percentile
    bootstrap). Replicates are computed in chunks of about ``chunk`` indices (memory).

    What the interval cannot know: it resamples the weights that were seen. If q misses
    a region of p (a mode, a well), no replicate contains it, and the interval is tight
    around the wrong value; if the weights are heavy-tailed, the heaviest are usually not
    in the sample and the interval is too narrow. Read it next to the ESS.
    """
    lw = _vector(log_w, "log_w", "log-weights")
    n = lw.numel()
    if n < 2:
        raise ImportanceInputError("log_z_bootstrap needs at least 2 log-weights")
    n_boot = _positive_int(n_boot, "n_boot")
    if n_boot < 2:
        raise ImportanceInputError(f"n_boot must be at least 2 for a standard error, got {n_boot}")
    if not 0 < level < 1:
        raise ImportanceInputError(f"level must lie in (0, 1), got {level}")
    per_chunk = max(1, chunk // n)
    replicates = []
    for start in range(0, n_boot, per_chunk):
        b = min(per_chunk, n_boot - start)
        idx = torch.randint(n, (b, n), generator=generator)
        replicates.append(_log_mean_exp(lw[idx]))
    reps = torch.cat(replicates)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(reps, q).tolist()
    return LogZBootstrap(float(_log_mean_exp(lw)), float(reps.std()), low, high, float(level), n, n_boot,
                         kish_ess(lw))


@dataclass(frozen=True)
class SubsampleEstimates:
    """log Ẑ and Kish ESS of ``n_draws`` subsamples of ``size`` weights each."""

    size: int
    log_z: Tensor  # (n_draws,) float64
    ess: Tensor  # (n_draws,) Kish ESS of each subsample, in [1, size]

    @property
    def ess_fraction(self) -> Tensor:
        """ESS / size of each subsample, ``(n_draws,)``."""
        return self.ess / self.size


def subsample_estimates(log_w: Tensor, size: int, n_draws: int,
                        generator: torch.Generator | None = None) -> SubsampleEstimates:
    r"""What an experiment with only ``size`` samples would have reported, ``n_draws`` times over.

    Each draw takes ``size`` of the pooled log-weights ``(n,)`` with replacement (a draw
    from the empirical distribution of the pool, faithful to fresh samples of q when
    ``size`` is much smaller than n) and computes log Ẑ and the Kish ESS
    exp(2 logsumexp(l) - logsumexp(2 l)) of that draw. With heavy-tailed weights most small
    draws miss the heaviest weights, so their ESS looks better than it is.
    """
    lw = _vector(log_w, "log_w", "log-weights")
    size = _positive_int(size, "size")
    n_draws = _positive_int(n_draws, "n_draws")
    idx = torch.randint(lw.numel(), (n_draws, size), generator=generator)
    sub = lw[idx]
    log_z = _log_mean_exp(sub)
    ess = torch.exp(2 * torch.logsumexp(sub, -1) - torch.logsumexp(2 * sub, -1))
    return SubsampleEstimates(size, log_z, ess)


def importance_resample(log_w: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    r"""Indices of ``n`` draws with replacement, index i with probability w̄_i = softmax(log w)_i.

    ``x[importance_resample(log_w, n)]`` is an unweighted sample that approximates p, usable
    by any metric that takes plain samples (histograms, energy W2). It holds repeats: the
    number of distinct indices is about the Kish ESS, never more information than the
    weights carried. Returns a long tensor ``(n,)``.
    """
    probs = self_normalized_weights(_vector(log_w, "log_w", "log-weights"))
    n = _positive_int(n, "n")
    return torch.multinomial(probs, n, replacement=True, generator=generator)


# ----------------------------------------------------------------------------------------
# free energies
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FreeEnergyEstimate:
    """ΔF in units of kT with its (delta-method) standard error."""

    delta_f: float
    standard_error: float
    method: str

    def __str__(self) -> str:
        return f"{self.method}: ΔF = {self.delta_f:.4f} ± {self.standard_error:.4f} kT"


def fep_free_energy(delta_u: Tensor, direction: str = "forward") -> FreeEnergyEstimate:
    r"""Free-energy perturbation (Zwanzig): ΔF = F_1 - F_0 in units of kT from one state's samples.

    ``delta_u`` ``(n,)`` holds Δu(x) = u_1(x) - u_0(x) (reduced potentials, E/kT) at the samples,
    with the same sign convention in both directions:

    - ``"forward"``: x ~ p_0,  ΔF = -log E_0[exp(-Δu)],
    - ``"reverse"``: x ~ p_1,  ΔF = +log E_1[exp(+Δu)].

    Standard error by the delta method, (n/ESS - 1)/(n - 1) as in
    :func:`boltzlab.metrics.log_z_estimate`. Both are biased (Jensen) in opposite
    directions and need the sampled state to cover where the other has its mass: forward
    FEP from a broad state into a narrow one works, the other way round it does not.
    With state 0 a normalised sampler q (u_0 = -log q) and state 1 the target
    (u_1 = E/kT), forward FEP is exactly the importance-sampling estimate -log Ẑ.
    """
    du = _vector(delta_u, "delta_u", "energy differences")
    if direction == "forward":
        terms, sign = -du, -1.0
    elif direction == "reverse":
        terms, sign = du, 1.0
    else:
        raise ImportanceInputError(f"direction must be 'forward' (samples of state 0) or 'reverse' "
                                   f"(samples of state 1), got {direction!r}")
    return FreeEnergyEstimate(sign * float(_log_mean_exp(terms)), _log_mean_se(terms), f"FEP {direction}")


def _log_fermi(z: Tensor) -> Tensor:
    """log f(z) = log 1/(1 + e^z) = -softplus(z), exact for any z."""
    return -torch.nn.functional.softplus(z)


def bar_free_energy(delta_u_0: Tensor, delta_u_1: Tensor, tol: float = 1e-12,
                    max_iter: int = 400) -> FreeEnergyEstimate:
    r"""Bennett acceptance ratio: ΔF = F_1 - F_0 (units of kT) from samples of BOTH states.

    ``delta_u_0`` ``(n_0,)``: Δu = u_1 - u_0 at samples of p_0; ``delta_u_1`` ``(n_1,)``: the
    same Δu = u_1 - u_0 at samples of p_1. With M = log(n_0/n_1) and the Fermi function
    f(z) = 1/(1 + e^z), ΔF solves

        Σ_{i ∈ 0} f(M + Δu_i - ΔF) = Σ_{j ∈ 1} f(-M - Δu_j + ΔF).

    The log of the left side minus the log of the right side is strictly increasing in ΔF
    (from -∞ to +∞), so the root is unique; it is bracketed by widening an interval around
    the two FEP estimates and found by bisection (every sum in log space, so no overflow).

    Standard error: the estimate is the root of g(ΔF) = log Σ f_0 - log Σ f_1; by the delta
    method SE² = [Var(log mean f_0) + Var(log mean f_1)] / g'(ΔF)², each variance
    (n/ESS - 1)/(n - 1) of its terms, with g' = mean(f_0(1 - f_0))/mean(f_0) +
    mean(f_1(1 - f_1))/mean(f_1). At the exact ΔF and large n, g' → 1 and this is Bennett's
    own variance formula.

    BAR uses both directions optimally (minimum asymptotic variance among estimators of
    this form) and needs only that the two states overlap, not that one covers the other.
    """
    du0 = _vector(delta_u_0, "delta_u_0", "energy differences")
    du1 = _vector(delta_u_1, "delta_u_1", "energy differences")
    n0, n1 = du0.numel(), du1.numel()
    m = math.log(n0 / n1)

    def g(delta_f: float) -> float:
        return float(torch.logsumexp(_log_fermi(m + du0 - delta_f), 0) - torch.logsumexp(_log_fermi(-m - du1 + delta_f), 0))

    fwd = -float(_log_mean_exp(-du0))
    rev = float(_log_mean_exp(du1))
    lo, hi = min(fwd, rev) - 1.0, max(fwd, rev) + 1.0
    width = hi - lo
    for _ in range(200):  # widen until the sign changes (it must: g runs from -inf to +inf)
        if g(lo) < 0 < g(hi):
            break
        width *= 2.0
        lo, hi = (lo - width, hi) if g(lo) >= 0 else (lo, hi + width)
    else:  # pragma: no cover - g is monotone and unbounded, so this cannot happen with finite input
        raise ImportanceInputError("BAR: could not bracket the root of the self-consistent equation")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if g(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * max(1.0, abs(mid)):
            break
    delta_f = 0.5 * (lo + hi)
    log_f0 = _log_fermi(m + du0 - delta_f)
    log_f1 = _log_fermi(-m - du1 + delta_f)
    var = _log_mean_se(log_f0) ** 2 + _log_mean_se(log_f1) ** 2
    # g'(ΔF): mean(f (1 - f)) / mean(f) for each state, with 1 - f(z) = f(-z)
    slope = sum(float(torch.exp(torch.logsumexp(lf + _log_fermi(-z), 0) - torch.logsumexp(lf, 0)))
                for lf, z in ((log_f0, m + du0 - delta_f), (log_f1, -m - du1 + delta_f)))
    return FreeEnergyEstimate(delta_f, math.sqrt(var) / slope, "BAR")


def state_free_energy_difference(log_w: Tensor, in_a: Tensor, in_b: Tensor) -> FreeEnergyEstimate:
    r"""ΔF_AB = F_B - F_A = -log(P_B / P_A) in units of kT, from one reweighted sample.

    ``log_w`` ``(n,)`` are importance log-weights of samples x_i ~ q toward p; ``in_a`` and
    ``in_b`` ``(n,)`` boolean masks of two disjoint states (e.g. the wells of a double well).
    P_A ∝ Σ_{i ∈ A} w_i (the normaliser cancels in the ratio), so

        ΔF_AB = log Σ_A w - log Σ_B w.

    Standard error by the delta method on the two means a_i = w_i 1_A, b_i = w_i 1_B:
    SE² = [Var(a)/ā² + Var(b)/b̄² - 2 Cov(a, b)/(ā b̄)] / n, with the weights rescaled by
    their maximum first (so nothing overflows). Raises if a state holds no sample: then
    the data say nothing about it (the support problem), and no estimate is honest.
    """
    lw = _vector(log_w, "log_w", "log-weights")
    n = lw.numel()
    masks = []
    for name, mask in (("in_a", in_a), ("in_b", in_b)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ImportanceInputError(f"{name}: expected a boolean tensor of shape ({n},), got {shape}")
        masks.append(mask.detach().cpu())
    a_mask, b_mask = masks
    if bool((a_mask & b_mask).any()):
        raise ImportanceInputError(f"in_a and in_b overlap at {int((a_mask & b_mask).sum())} samples; states must be disjoint")
    for name, mask in (("A", a_mask), ("B", b_mask)):
        if not bool(mask.any()):
            raise ImportanceInputError(f"state {name} holds none of the {n} samples: its free energy cannot be "
                                       f"estimated (the sampler never proposed it)")
    w = torch.exp(lw - lw.max())
    a, b = w * a_mask, w * b_mask
    delta_f = float(torch.logsumexp(lw[a_mask], 0) - torch.logsumexp(lw[b_mask], 0))
    am, bm = a.mean(), b.mean()
    cov = torch.cov(torch.stack([a, b]))
    var = cov[0, 0] / am**2 + cov[1, 1] / bm**2 - 2 * cov[0, 1] / (am * bm)
    return FreeEnergyEstimate(delta_f, float(torch.sqrt(var.clamp_min(0.0) / n)), "reweighting")


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
