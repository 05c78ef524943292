"""Well-conditioned networks for every noise level: a score (:class:`ScaledScore`) and an energy
(:class:`ScaledEnergy`) whose raw network sees inputs, and predicts outputs, of order one."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from boltzlab.diffusion._checks import DiffusionInputError
from boltzlab.diffusion.schedule import GeometricNoiseSchedule


class ScaledScore(torch.nn.Module):
    r"""A well-conditioned score parameterisation around a raw network ``net(x, t)``:

        s(x, t) = net(x / c_in(t), t) / c_out(t),
        c_in(t) = sqrt(data_scale^2 + sigma_t^2),   c_out(t) = sqrt(sigma_t^2 + local_scale^2).

    ``data_scale`` is the spread of the samples (their coordinates' size), so the network
    sees inputs of unit scale at every t. ``local_scale`` is the width of the target's
    wells (GMM-40: the component std; particle systems: about kT / typical force): the
    score of p_t has size about 1 / c_out(t), so the network predicts an order-one
    quantity at every noise level, and :meth:`weight` lambda(t) = c_out(t)^2 makes the
    regression loss order-one from sigma_min to sigma_max. Two failure modes it avoids:
    without c_out the reverse SDE multiplies a network error e at large t by
    g^2 dt ~ 2 log(r) sigma_1^2 dt (hundreds for GMM-40); with c_out = sigma_t alone the
    network must output values of size sigma_t / local_scale at small t, and tiny errors
    there become large score errors in the last, decisive steps of sampling.
    Dividing by positive scalars keeps the symmetries of ``net`` (E(3) and permutation
    equivariance, centre-of-mass-free outputs).
    """

    def __init__(self, net: torch.nn.Module, schedule: GeometricNoiseSchedule, data_scale: float = 1.0,
                 local_scale: float | None = None) -> None:
        super().__init__()
        local_scale = schedule.sigma_min if local_scale is None else local_scale
        for name, value in (("data_scale", data_scale), ("local_scale", local_scale)):
            if not (math.isfinite(value) and value > 0):
                raise DiffusionInputError(f"{name} must be positive and finite, got {value}")
        self.net, self.schedule = net, schedule
        self.data_scale, self.local_scale = float(data_scale), float(local_scale)

    def weight(self, t: Tensor) -> Tensor:
        """lambda(t) = c_out(t)^2, shape of ``t``."""
        return self.schedule.variance(t) + self.local_scale**2

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        var = self.schedule.variance(t)[:, None]
        c_in = (self.data_scale**2 + var).sqrt()
        c_out = (var + self.local_scale**2).sqrt()
        return self.net(x / c_in, t) / c_out


class ScaledEnergy(torch.nn.Module):
    r"""The energy counterpart of :class:`ScaledScore`, for networks that learn E_t (NEM):

        E(x, t) = |x|^2 / (2 c_in(t)^2) + net(x / c_in(t), t),   c_in(t) = sqrt(data_scale^2 + sigma_t^2).

    The quadratic term is the noised energy of a Gaussian of width ``data_scale``, which is
    what every target looks like from far away at large t; the network learns the rest, an
    order-one correction, instead of energies that grow like |x|^2. ``net`` maps
    (x (B, dim), t (B,)) to (B,).
    """

    def __init__(self, net: torch.nn.Module, schedule: GeometricNoiseSchedule, data_scale: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(data_scale) and data_scale > 0):
            raise DiffusionInputError(f"data_scale must be positive and finite, got {data_scale}")
        self.net, self.schedule, self.data_scale = net, schedule, float(data_scale)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c_in2 = self.data_scale**2 + self.schedule.variance(t)
        return 0.5 * x.pow(2).sum(-1) / c_in2 + self.net(x / c_in2.sqrt()[:, None], t)
