r"""Gaussian samplers with everything in closed form: a test bed for fine-tuning methods.

:class:`GaussianScore` is the exact noised score of N(mu, v I), s(x, t) = -(x - mu)/(v + sigma_t^2),
with learnable mu and log v: a model family that contains the KL-regularised optimum of the
tempering reward r = -(1/kT - 1/kT0)|x|^2/2 on N(0, kT0 I) (the optimum is N(0, kT I)) and of a
linear reward a . x (the optimum is N(mu + v a/alpha, v I)).

For such a score the discretised reverse SDE (:mod:`boltzlab.finetune.chain`, no projection) is
linear: per coordinate, with c_k = v + sigma_{t_k}^2,

    x_{k+1} = a_k x_k + b_k + sqrt(Δ_k) z,   a_k = 1 - Δ_k / c_k,   b_k = Δ_k mu / c_k,

so the mean m_k and the variance P_k of x_k follow m_{k+1} = a_k m_k + b_k, P_{k+1} = a_k^2 P_k + Δ_k
from m_0 = 0, P_0 = sigma_1^2. The per-step KL to a second Gaussian sampler (mu', v') is
(Δ_k/2) E|alpha_k x + beta_k|^2 with alpha_k = 1/c'_k - 1/c_k, beta_k = mu/c_k - mu'/c'_k, and for
r(x) = a . x - c |x|^2 / 2, E[r(x_K)] = a . m_K - c (|m_K|^2 + dim P_K) / 2. Hence
:func:`gaussian_chain_objective` gives J = E[r] - alpha KL(P_theta || P_pre) exactly, as a
differentiable function of (mu, log v): its autograd gradient is the exact gradient that a policy
gradient or reward backpropagation estimates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from boltzlab.diffusion import GeometricNoiseSchedule
from boltzlab.finetune._checks import _positive_float, _positive_int
from boltzlab.finetune.chain import chain_grid


class GaussianScore(nn.Module):
    """The exact noised score of N(mu, v I): ``(B, dim), (B,) -> (B, dim)``, with parameters
    ``mu`` (dim,) and ``log_var`` (scalar), float64."""

    def __init__(self, mu: list[float], var: float, schedule: GeometricNoiseSchedule) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))
        self.log_var = nn.Parameter(torch.tensor(math.log(_positive_float(var, "var")), dtype=torch.float64))
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return -(x - self.mu) / (self.log_var.exp() + self.schedule.variance(t))[:, None]


def gaussian_chain_moments(mu: Tensor, var: Tensor, schedule: GeometricNoiseSchedule, n_steps: int
                           ) -> tuple[Tensor, Tensor]:
    """Mean (K + 1, dim) and per-coordinate variance (K + 1,) of x_k along the chain of N(mu, var I)'s
    score (module docstring); differentiable in ``mu`` (dim,) and ``var`` (scalar)."""
    times, deltas = chain_grid(schedule, _positive_int(n_steps, "n_steps"), torch.float64)
    sig2 = schedule.variance(times)
    m = torch.zeros_like(mu)
    p = torch.tensor(schedule.prior_std**2, dtype=torch.float64)
    means, variances = [m], [p]
    for k in range(n_steps):
        c = var + sig2[k]
        a = 1.0 - deltas[k] / c
        m = a * m + deltas[k] * mu / c
        p = a * a * p + deltas[k]
        means.append(m)
        variances.append(p)
    return torch.stack(means), torch.stack(variances)


def gaussian_chain_objective(
    mu: Tensor,
    var: Tensor,
    pre_mu: Tensor,
    pre_var: float,
    schedule: GeometricNoiseSchedule,
    n_steps: int,
    *,
    linear: Tensor | None = None,
    quadratic: float = 0.0,
    alpha: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Exact (E[r(x_K)], KL(P_theta || P_pre), J = E[r] - alpha KL) for the sampler of N(mu, var I)
    against that of N(pre_mu, pre_var I), reward r(x) = linear . x - quadratic |x|^2 / 2.

    ``mu`` (dim,), ``var`` scalar tensor (differentiable); returns three scalar tensors."""
    dim = mu.shape[0]
    times, deltas = chain_grid(schedule, _positive_int(n_steps, "n_steps"), torch.float64)
    sig2 = schedule.variance(times)
    means, variances = gaussian_chain_moments(mu, var, schedule, n_steps)
    kl = torch.zeros((), dtype=torch.float64)
    for k in range(n_steps):
        c, c_pre = var + sig2[k], pre_var + sig2[k]
        slope = 1.0 / c_pre - 1.0 / c
        offset = mu / c - pre_mu / c_pre
        m, p = means[k], variances[k]
        second = slope**2 * (dim * p + m.pow(2).sum()) + 2 * slope * (offset * m).sum() + offset.pow(2).sum()
        kl = kl + 0.5 * deltas[k] * second
    m_end, p_end = means[-1], variances[-1]
    expected = -0.5 * quadratic * (m_end.pow(2).sum() + dim * p_end)
    if linear is not None:
        expected = expected + (linear * m_end).sum()
    return expected, kl, expected - alpha * kl


def gaussian_chain_optimum(pre_mu: list[float], pre_var: float, schedule: GeometricNoiseSchedule, n_steps: int,
                           *, linear: Tensor | None = None, quadratic: float = 0.0, alpha: float = 1.0,
                           iterations: int = 200) -> tuple[Tensor, float, float]:
    """The (mu, var) of the Gaussian family maximising :func:`gaussian_chain_objective` (L-BFGS from the
    pretrained parameters) and the maximal J: ``(mu (dim,), var, J)``. It is the discretised chain's
    own optimum, which the continuous-time one (a tilted Gaussian) approaches as n_steps grows."""
    pre = torch.tensor(pre_mu, dtype=torch.float64)
    mu = pre.clone().requires_grad_(True)
    log_var = torch.tensor(math.log(pre_var), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([mu, log_var], max_iter=iterations, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -gaussian_chain_objective(mu, log_var.exp(), pre, pre_var, schedule, n_steps, linear=linear,
                                         quadratic=quadratic, alpha=alpha)[2]
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        j = gaussian_chain_objective(mu, log_var.exp(), pre, pre_var, schedule, n_steps, linear=linear,
                                     quadratic=quadratic, alpha=alpha)[2]
    return mu.detach(), float(log_var.detach().exp()), float(j)
