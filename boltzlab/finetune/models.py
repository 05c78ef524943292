"""Score models for fine-tuning: :class:`PreconditionedScore`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from boltzlab.diffusion import GeometricNoiseSchedule
from boltzlab.finetune._checks import _positive_float


class PreconditionedScore(nn.Module):
    r"""A score network with O(1) inputs and outputs at every noise level:

        s(x, t) = -x / c_t^2 + net(x / c_t, t) / c_t,    c_t = sqrt(sigma_t^2 + sigma_d^2).

    The first term is the exact noised score of N(0, sigma_d^2 I), so ``net`` only learns
    the correction. Without it a plain MLP must output scores that shrink like 1/sigma_t^2
    over four decades of noise (sigma_max = 20 down to 0.01), and trains much worse on
    the same budget. ``net(x, t)``: e.g. :class:`boltzlab.models.ScoreMLP`;
    ``data_std``: sigma_d, about the standard deviation of the data. ``(B, dim), (B,) -> (B, dim)``.

    ``input_limit`` = L passes u = L tanh((x/c_t)/L) to the network instead of x/c_t (a smooth,
    invertible clamp; None switches it off). Far outside the data an MLP's output grows
    linearly, which can turn the confining -x/c_t^2 into a repelling term; likelihoods by
    the probability-flow ODE (which carries a point outwards, from data to noise) then blow
    up for points in the tails. With the clamp the correction stays bounded and the tails
    stay Gaussian.
    """

    def __init__(self, net: nn.Module, schedule: GeometricNoiseSchedule, data_std: float,
                 input_limit: float | None = 5.0) -> None:
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.data_std = _positive_float(data_std, "data_std")
        self.input_limit = None if input_limit is None else _positive_float(input_limit, "input_limit")

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c = (self.schedule.variance(t) + self.data_std**2).sqrt()[:, None]
        u = x / c
        if self.input_limit is not None:  # smooth clamp: no linear extrapolation far from the data
            u = self.input_limit * torch.tanh(u / self.input_limit)
        return -x / c**2 + self.net(u, t) / c
