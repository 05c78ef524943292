"""Free energies in units of kT: free-energy perturbation, the Bennett acceptance ratio, log Z
of a sampler's target three ways, and the free-energy difference of two states of one
reweighted sample (:mod:`boltzlab.importance`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzlab.importance.weights import (
    ImportanceInputError,
    _log_mean_exp,
    _log_mean_se,
    _vector,
)

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


def log_z_three_ways(log_w_at_q: Tensor, log_w_at_p: Tensor) -> dict[str, FreeEnergyEstimate]:
    r"""-log Z of the target, three ways, for a normalised sampler q (state 0, u_0 = -log q,
    Z_0 = 1) and the target p ∝ exp(-E/kT) (state 1, u_1 = E/kT), so ΔF = F_1 - F_0 = -log Z.

    Both arguments are the same log-weight function log w(x) = -E(x)/kT - log q(x) (the one
    :func:`sampler_log_weights` computes), evaluated at ``log_w_at_q`` ``(n_0,)`` samples of q
    and at ``log_w_at_p`` ``(n_1,)`` samples of p (MCMC, say). Since Δu = u_1 - u_0 = -log w:

    - ``"FEP forward (sampler samples)"``: -log mean_q(w), the importance-sampling estimate;
    - ``"FEP reverse (samples of p)"``: log mean_p(1/w), harmonic-mean-like, needs q to cover p's tails;
    - ``"BAR (both)"``: :func:`bar_free_energy`.

    The forward estimate uses only the sampler's own samples; the other two also use samples
    of p that the sampler never saw, so their agreement is a check from outside q. Returns
    the three :class:`FreeEnergyEstimate` (their ``delta_f`` is -log Z; negate for log Z)."""
    lw_q = _vector(log_w_at_q, "log_w_at_q", "log-weights")
    lw_p = _vector(log_w_at_p, "log_w_at_p", "log-weights")
    return {"FEP forward (sampler samples)": fep_free_energy(-lw_q, "forward"),
            "FEP reverse (samples of p)": fep_free_energy(-lw_p, "reverse"),
            "BAR (both)": bar_free_energy(-lw_q, -lw_p)}


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
