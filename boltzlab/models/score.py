r"""Time-conditioned score and energy networks for diffusion samplers (chapters 05, 06, 08).

A score network maps (x (B, dim), t (B,)) to s (B, dim), the signature the samplers in
:mod:`boltzlab.diffusion` expect. t lives in [0, 1] (0: the target, 1: the noise prior).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from boltzlab.models.blocks import (
    MLP,
    ModelInputError,
    _check_count,
    _check_dtype,
    _check_positive_float,
    _check_times,
    check_batch,
)


class SinusoidalTimeEmbedding(nn.Module):
    r"""Sin/cos features of a diffusion time t in [0, 1]: ``(B,) -> (B, dim)``.

    With ``half = dim / 2`` angular frequencies in geometric progression,

        w_k = max_period^(1 - k / half),   k = 0, ..., half - 1   (from max_period down to
                                                                    max_period^(1/half)),
        phi(t) = [sin(w_0 t), ..., sin(w_{half-1} t), cos(w_0 t), ..., cos(w_{half-1} t)].

    This is the transformer position embedding of the "step index" max_period * t: the
    slow features tell early from late times, the fast ones resolve time differences of
    about 1 / max_period. ``dim`` must be even. No parameters.
    """

    def __init__(self, dim: int, max_period: float = 1000.0) -> None:
        super().__init__()
        _check_count(dim, "dim")
        if dim % 2:
            raise ModelInputError(f"dim must be even (half sin, half cos features), got {dim}")
        self.dim = dim
        self.max_period = _check_positive_float(max_period, "max_period")

    def frequencies(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
        """w_k, shape ``(dim / 2,)`` (made on demand in the caller's dtype: no rounding
        through float32 for float64 input, and nothing to save in a checkpoint)."""
        half = self.dim // 2
        k = torch.arange(half, dtype=dtype, device=device)
        return (math.log(self.max_period) * (1.0 - k / half)).exp()

    def forward(self, t: Tensor) -> Tensor:
        """``(B,) -> (B, dim)``, in ``t``'s dtype."""
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim != 1:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ModelInputError(f"t: expected a floating tensor of shape (B,), got {shape}")
        arg = t[:, None] * self.frequencies(t.dtype, t.device)
        return torch.cat([arg.sin(), arg.cos()], dim=-1)


class _TimeConditionedMLP(nn.Module):
    """h_0 = [x, phi(t)]; ``n_layers`` hidden layers of width ``hidden`` with SiLU; linear output."""

    def __init__(self, dim: int, out_dim: int, hidden: int, n_layers: int, time_dim: int,
                 max_period: float, seed: int | None) -> None:
        super().__init__()
        self.dim = _check_count(dim, "dim")
        self.hidden, self.n_layers = _check_count(hidden, "hidden"), _check_count(n_layers, "n_layers")
        self.time_dim = _check_count(time_dim, "time_dim")
        self.time_embedding = SinusoidalTimeEmbedding(time_dim, max_period)
        self.net = MLP(dim + time_dim, out_dim, (hidden,) * n_layers, "silu", seed)

    def _features(self, x: Tensor, t: Tensor) -> Tensor:
        x = check_batch(x, self.dim)
        t = _check_times(t, x)
        _check_dtype(self, x)
        return self.net(torch.cat([x, self.time_embedding(t)], dim=-1))


class ScoreMLP(_TimeConditionedMLP):
    r"""Time-conditioned MLP score network s_theta(x, t): ``(B, dim), (B,) -> (B, dim)``.

        h_0 = [x, phi(t)]                       (concatenation, phi: SinusoidalTimeEmbedding)
        h_l = SiLU(W_l h_{l-1} + b_l),          l = 1, ..., n_layers (width ``hidden``)
        s   = project(W_out h_L + b_out)

    The time features enter once, concatenated to x, rather than being added in every
    layer: with a few layers on low-dimensional targets the first layer already sees x and
    t jointly, and the network stays a plain :class:`MLP` that a learner can read. SiLU is
    smooth, so the score (and, for :class:`EnergyMLP`, its gradient) has no kinks.

    ``project`` (e.g. ``lambda s: remove_com(s, n, d)`` for particle systems) is applied to
    the output, so the score stays in the subspace the samples live in.
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, time_dim: int = 32,
                 project: Callable[[Tensor], Tensor] | None = None, *, max_period: float = 1000.0,
                 seed: int | None = None) -> None:
        super().__init__(dim, dim, hidden, n_layers, time_dim, max_period, seed)
        if project is not None and not callable(project):
            raise ModelInputError(f"project must be callable or None, got {type(project).__name__}")
        self.project = project

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x (B, dim), t (B,) -> s (B, dim)``."""
        out = self._features(x, t)
        return self.project(out) if self.project is not None else out


class EnergyMLP(_TimeConditionedMLP):
    r"""Time-conditioned scalar energy E_theta(x, t): ``(B, dim), (B,) -> (B,)``.

    The same body as :class:`ScoreMLP` (h_0 = [x, phi(t)], SiLU hidden layers) with one
    output; wrap it in :class:`EnergyScore` to get the score -∇_x E_theta / kT.
    """

    def __init__(self, dim: int, hidden: int = 128, n_layers: int = 3, time_dim: int = 32, *,
                 max_period: float = 1000.0, seed: int | None = None) -> None:
        super().__init__(dim, 1, hidden, n_layers, time_dim, max_period, seed)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x (B, dim), t (B,) -> E (B,)``."""
        return self._features(x, t).squeeze(-1)


class EnergyScore(nn.Module):
    r"""Score of a learned energy: s(x, t) = -∇_x E_theta(x, t) / kT, ``(B, dim), (B,) -> (B, dim)``.

    ``net(x, t)`` must return energies of shape ``(B,)`` (e.g. :class:`EnergyMLP`). The
    gradient is taken with ``create_graph=True`` whenever autograd is recording at the
    call (training), so a loss on the score, such as a regression onto a Monte Carlo score
    estimate (NEM), back-propagates into the energy's parameters. Under
    ``torch.no_grad()`` (the samplers) the score comes back detached, without a graph.
    ``project`` (optional) is applied to the score.
    """

    def __init__(self, net: nn.Module, kT: float = 1.0, *,
                 project: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ModelInputError(f"net must be an nn.Module returning energies (B,), got {type(net).__name__}")
        if project is not None and not callable(project):
            raise ModelInputError(f"project must be callable or None, got {type(project).__name__}")
        self.net, self.kT, self.project = net, _check_positive_float(kT, "kT"), project

    def energy(self, x: Tensor, t: Tensor) -> Tensor:
        """E_theta(x, t): ``(B, dim), (B,) -> (B,)``."""
        e = self.net(x, t)
        if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
            shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ModelInputError(f"the energy network must return shape ({x.shape[0]},), got {shape}")
        return e

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x (B, dim), t (B,) -> s (B, dim)``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            what = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise ModelInputError(f"x: expected a floating tensor of shape (B, dim), got {what}")
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            e = self.energy(xg, t)
            (grad,) = torch.autograd.grad(e.sum(), xg, create_graph=create_graph)
        score = -grad / self.kT
        return self.project(score) if self.project is not None else score
