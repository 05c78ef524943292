r"""GANs (chapter 01): :class:`Generator` x = G(z), :class:`Discriminator` (logits) and the WGAN
:class:`Critic`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzlab.models.blocks import (
    MLP,
    Standardizer,
    _check_count,
    _standard_normal,
    check_batch,
)


class Generator(nn.Module):
    r"""GAN generator: x = loc + scale · G(z) with z ~ N(0, I_{z_dim}) and G an :class:`MLP`.

    ``forward(z)`` maps ``(B, z_dim) -> (B, x_dim)`` in data units.
    """

    def __init__(self, z_dim: int, x_dim: int, hidden: Sequence[int] = (64, 64), data: Tensor | None = None,
                 activation: str = "silu", seed: int | None = None) -> None:
        super().__init__()
        self.z_dim, self.x_dim = _check_count(z_dim, "z_dim"), _check_count(x_dim, "x_dim")
        self.net = MLP(z_dim, x_dim, hidden, activation, seed)
        self.standardizer = Standardizer.fit(data) if data is not None else Standardizer.identity(x_dim)

    def forward(self, z: Tensor) -> Tensor:
        """``(B, z_dim) -> (B, x_dim)``."""
        return self.standardizer.inverse(self.net(check_batch(z, self.z_dim, "z")))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """x = G(z), z ~ N(0, I): ``(n, x_dim)``, with gradients (wrap in ``torch.no_grad()`` to evaluate)."""
        z = _standard_normal((_check_count(n), self.z_dim), self.standardizer.loc, generator)
        return self(z)


class Discriminator(nn.Module):
    r"""Scalar function of a configuration, D: ``(B, x_dim) -> (B,)``, an :class:`MLP` on
    standardised coordinates. As a GAN discriminator its output is a logit: the
    probability that x is real is sigmoid(D(x))."""

    def __init__(self, x_dim: int, hidden: Sequence[int] = (64, 64), data: Tensor | None = None,
                 activation: str = "leaky_relu", seed: int | None = None) -> None:
        super().__init__()
        self.x_dim = _check_count(x_dim, "x_dim")
        self.net = MLP(x_dim, 1, hidden, activation, seed)
        self.standardizer = Standardizer.fit(data) if data is not None else Standardizer.identity(x_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, x_dim) -> (B,)``."""
        return self.net(self.standardizer(check_batch(x, self.x_dim))).squeeze(-1)


class Critic(Discriminator):
    r"""WGAN critic f: ``(B, x_dim) -> (B,)``, an unbounded score (no sigmoid).

    The Kantorovich-Rubinstein dual W1(p, q) = sup_{|f|_L <= 1} E_p f - E_q f needs f to be
    1-Lipschitz in x (data units); :func:`boltzlab.training.gradient_penalty` enforces it
    softly. The network m works on standardised u = (x - loc) / scale, so

        f(x) = s · m(u),   s = mean_i scale_i,

    which makes ∇_x f = s · diag(1/scale) ∇_u m of order |∇_u m|: a network with
    gradients of order one is already about 1-Lipschitz in data units, instead of having
    to grow its weights by the data's scale (about 23 for GMM-40) before the penalty is
    met. No batch normalisation anywhere: the penalty is per sample.
    """

    output_scale: Tensor

    def __init__(self, x_dim: int, hidden: Sequence[int] = (64, 64), data: Tensor | None = None,
                 activation: str = "leaky_relu", seed: int | None = None) -> None:
        super().__init__(x_dim, hidden, data, activation, seed)
        self.register_buffer("output_scale", self.standardizer.scale.mean())

    def forward(self, x: Tensor) -> Tensor:
        """``(B, x_dim) -> (B,)``."""
        return self.output_scale.to(x.dtype) * super().forward(x)
