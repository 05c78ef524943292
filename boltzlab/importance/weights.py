"""Importance weights of a sampler, log Z with a bootstrap interval, estimates on small
subsamples, and resampling (:mod:`boltzlab.importance`). Also the input checks every part of
the package shares, and :class:`ImportanceInputError`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzlab.energies import Energy
from boltzlab.metrics import (
    MetricInputError,
    kish_ess,
    self_normalized_weights,
)
from boltzlab.validation import check_positive_int


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
