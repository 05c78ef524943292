"""The forward (noising) process: the geometric VE schedule, the prior sampling starts from,
noised samples x_t = x_0 + sigma_t eps and the training times t ~ U(t_min, 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from boltzlab.diffusion._checks import DiffusionInputError, Projection, _identity


@dataclass(frozen=True)
class GeometricNoiseSchedule:
    """The VE geometric schedule above, with ``0 < sigma_min < sigma_max``."""

    sigma_min: float = 0.01
    sigma_max: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max)) or not (
            0.0 < self.sigma_min < self.sigma_max
        ):
            raise DiffusionInputError(
                f"need 0 < sigma_min < sigma_max (finite), got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )

    @property
    def log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient g(t)^2, same shape as ``t``."""
        return 2.0 * self.log_ratio * self.sigma_min**2 * torch.exp(2.0 * self.log_ratio * t)

    def g(self, t: Tensor) -> Tensor:
        """Diffusion coefficient g(t), same shape as ``t``."""
        return self.g2(t).sqrt()

    def variance(self, t: Tensor) -> Tensor:
        """sigma_t^2 = sigma_min^2 (r^(2t) - 1), the variance of x_t given x_0 (0 at t = 0)."""
        return self.sigma_min**2 * torch.expm1(2.0 * self.log_ratio * t)

    def std(self, t: Tensor) -> Tensor:
        """sigma_t, same shape as ``t``."""
        return self.variance(t).clamp_min(0.0).sqrt()

    def time_at_std(self, sigma: Tensor) -> Tensor:
        """The inverse of :meth:`std`: t = log(1 + sigma^2 / sigma_min^2) / (2 log r), same shape as
        ``sigma`` (sigma >= 0; a sigma above sigma_1 gives t > 1)."""
        if bool((sigma < 0).any()):
            raise DiffusionInputError(f"sigma must be >= 0, got a minimum of {float(sigma.min())}")
        return torch.log1p((sigma / self.sigma_min) ** 2) / (2.0 * self.log_ratio)

    @property
    def prior_std(self) -> float:
        """sigma_1, the standard deviation of the prior N(0, sigma_1^2 I) sampling starts from."""
        return self.sigma_min * math.sqrt(math.expm1(2.0 * self.log_ratio))


def sample_prior(
    schedule: GeometricNoiseSchedule,
    n: int,
    dim: int,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """x_1 ~ N(0, sigma_1^2 I), projected: shape ``(n, dim)``."""
    project = project or _identity
    z = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    return project(z * schedule.prior_std)


def perturb(
    x0: Tensor,
    t: Tensor,
    schedule: GeometricNoiseSchedule,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw x_t = x_0 + sigma_t eps. ``x0`` (B, dim), ``t`` (B,) -> (x_t, eps), both (B, dim)."""
    project = project or _identity
    eps = project(torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device))
    return x0 + schedule.std(t)[:, None] * eps, eps


def sample_times(n: int, *, generator: torch.Generator | None = None, t_min: float = 0.0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """t ~ U(t_min, 1), shape (n,)."""
    return t_min + (1.0 - t_min) * torch.rand(n, generator=generator, dtype=dtype, device=device)
