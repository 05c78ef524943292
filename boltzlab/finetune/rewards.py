"""Rewards and their KL-regularised optima: :class:`BoltzmannReward` (differentiable, the optimum
is a Boltzmann density), :class:`InnerPairReward` (piecewise constant), and the optimum's
summary by importance sampling from the pretrained model (:func:`tilted_optimum`) or exactly
for a discrete reward (:func:`discrete_tilted_optimum`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from boltzlab.energies import Energy, PairPotential
from boltzlab.finetune._checks import FinetuneInputError, _positive_float, _tensor


@dataclass(frozen=True)
class BoltzmannReward:
    r"""r(x) = -(1/kT - 1/kT0) E(x): tilting p_kT0 by exp(r) gives p_kT exactly.

    ``energy`` is any :class:`~boltzlab.energies.Energy` (its own kT is ignored). Calling the
    reward on ``x`` of shape ``(B, dim)`` returns ``(B,)``.
    """

    energy: Energy
    kT: float
    kT0: float
    differentiable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _positive_float(self.kT, "kT")
        _positive_float(self.kT0, "kT0")

    @property
    def coefficient(self) -> float:
        """1/kT - 1/kT0 (positive when fine-tuning towards a colder target)."""
        return 1.0 / self.kT - 1.0 / self.kT0

    def __call__(self, x: Tensor) -> Tensor:
        return -self.coefficient * self.energy.energy(x)

    def tilted_kT(self, tilt: float) -> float:
        r"""kT of p_kT0 · exp(tilt · r): 1 / (1/kT0 + tilt (1/kT - 1/kT0)); tilt = 1 gives kT."""
        beta = 1.0 / self.kT0 + float(tilt) * self.coefficient
        if not beta > 0:
            raise FinetuneInputError(f"tilt {tilt} gives a non-positive inverse temperature {beta}")
        return 1.0 / beta


@dataclass(frozen=True)
class InnerPairReward:
    r"""A non-differentiable structural reward: r(x) = scale · #{pairs i < j : d_ij < cutoff}.

    For DW-4 the pair potential 0.9 (d - 4)^4 - 4 (d - 4)^2 has its barrier at d = 4 (the default
    ``cutoff``, :attr:`~boltzlab.energies.PairPotential.dw_d0`), between an inner well at
    d = 4 - sqrt(20/9) ≈ 2.51 and an outer one at ≈ 5.49, so r counts the pairs in the inner well.
    Piecewise constant: its gradient is zero almost everywhere, so reward backpropagation cannot
    use it (``differentiable = False``). ``(B, dim) -> (B,)``.
    """

    energy: PairPotential
    scale: float = 1.0
    cutoff: float | None = None
    differentiable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.energy, PairPotential):
            raise FinetuneInputError(f"InnerPairReward needs a PairPotential, got {type(self.energy).__name__}")
        _positive_float(self.scale, "scale")
        if self.cutoff is not None:
            _positive_float(self.cutoff, "cutoff")

    @property
    def threshold(self) -> float:
        """The cutoff distance in use."""
        return float(self.cutoff if self.cutoff is not None else self.energy.dw_d0)

    def count(self, x: Tensor) -> Tensor:
        """Number of inner pairs, (B, dim) -> (B,) integer."""
        with torch.no_grad():
            return (self.energy.pair_distances(x) < self.threshold).sum(-1)

    def __call__(self, x: Tensor) -> Tensor:
        return self.scale * self.count(x).to(x.dtype)


@dataclass(frozen=True)
class TiltedOptimum:
    r"""The KL-regularised optimum q* ∝ q_pre exp(r/alpha), summarised by importance sampling from
    q_pre (:func:`tilted_optimum`). ``objective`` = alpha log Z = max_q E_q[r] - alpha KL(q || q_pre);
    ``reward`` = E_{q*}[r]; ``kl`` = KL(q* || q_pre) = E_{q*}[r]/alpha - log Z; ``ess``: Kish ESS of
    the weights; ``*_se``: delta-method standard errors; ``n``: samples used."""

    alpha: float
    log_z: float
    objective: float
    reward: float
    kl: float
    ess: float
    n: int
    log_z_se: float
    reward_se: float
    kl_se: float

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in self.__dataclass_fields__}


def tilted_optimum(rewards: Tensor, alpha: float = 1.0) -> TiltedOptimum:
    r"""Estimate the optimum of E_q[r] - alpha KL(q || q_pre) from rewards r_i = r(x_i), x_i ~ q_pre.

    With w_i = exp(r_i/alpha) (in log space), Z = mean_i w_i = E_pre[e^{r/alpha}]:

        log Z,    E_{q*}[r] = sum_i w_i r_i / sum_i w_i,    KL(q* || q_pre) = E_{q*}[r]/alpha - log Z,

    and the optimum's objective alpha log Z. Standard errors are std(phi_i)/sqrt(n) of each
    estimator's influence function phi: for log Z, w_i/w̄ - 1; for E*[r], (w_i/w̄)(r_i - E*[r]);
    for the KL, their combination (w_i/w̄)(r_i - E*[r])/alpha - (w_i/w̄ - 1). Only as good as the
    weights' ESS (reported): a tilt that moves q* far from q_pre needs many samples.
    ``rewards`` (n,), n >= 2.
    """
    r = _tensor(rewards, 1, "rewards", "(n,)").to(torch.float64)
    alpha = _positive_float(alpha, "alpha")
    n = r.shape[0]
    if n < 2:
        raise FinetuneInputError(f"need at least 2 samples to estimate the optimum, got {n}")
    log_w = r / alpha
    log_z = float(torch.logsumexp(log_w, 0)) - math.log(n)
    rel = torch.exp(log_w - log_z)  # w_i / mean(w)
    mean_r = float((rel * r).sum() / n)
    kl = mean_r / alpha - log_z
    phi_z = rel - 1.0
    phi_r = rel * (r - mean_r)
    phi_kl = phi_r / alpha - phi_z
    se = lambda phi: float(phi.std() / math.sqrt(n))  # noqa: E731
    ess = float(rel.sum() ** 2 / rel.pow(2).sum())
    return TiltedOptimum(alpha=alpha, log_z=log_z, objective=alpha * log_z, reward=mean_r, kl=kl, ess=ess, n=n,
                         log_z_se=se(phi_z), reward_se=se(phi_r), kl_se=se(phi_kl))


def discrete_tilted_optimum(probs: Tensor, values: Tensor, alpha: float = 1.0) -> dict[str, float]:
    r"""The same optimum, exactly, for a reward taking the value ``values[c]`` with probability
    ``probs[c]`` under q_pre (c = 1..C; ``probs`` sums to 1): Z = sum_c p_c e^{v_c/alpha},
    q*(c) = p_c e^{v_c/alpha} / Z. Returns ``log_z``, ``objective``, ``reward``, ``kl``. (C,), (C,)."""
    p = _tensor(probs, 1, "probs", "(C,)").to(torch.float64)
    v = _tensor(values, 1, "values", "(C,)").to(torch.float64)
    alpha = _positive_float(alpha, "alpha")
    if p.shape != v.shape:
        raise FinetuneInputError(f"probs {tuple(p.shape)} and values {tuple(v.shape)} differ in shape")
    if bool((p < 0).any()) or abs(float(p.sum()) - 1.0) > 1e-6:
        raise FinetuneInputError(f"probs must be non-negative and sum to 1, got sum {float(p.sum()):.6g}")
    keep = p > 0
    log_terms = p[keep].log() + v[keep] / alpha
    log_z = float(torch.logsumexp(log_terms, 0))
    q = torch.exp(log_terms - log_z)
    mean_r = float((q * v[keep]).sum())
    return {"log_z": log_z, "objective": alpha * log_z, "reward": mean_r, "kl": mean_r / alpha - log_z}
