r"""Building blocks shared by every model: :class:`MLP`, :class:`Standardizer`, the input
checks (each raising :class:`ModelInputError` with a message that names the problem) and the
seeded weight initialisation (:func:`_seeded`)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from boltzlab.validation import check_points

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}

LOG_2PI = math.log(2 * math.pi)


class ModelInputError(ValueError):
    """Raised when a model gets input of the wrong shape, dtype or size."""


def check_batch(x: Tensor, dim: int, name: str = "x") -> Tensor:
    """``x`` must be a floating tensor of shape ``(B, dim)``; returns it unchanged."""
    return check_points(x, dim, name, ModelInputError, batched=True)


def _check_count(n: int, name: str = "n") -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ModelInputError(f"{name} must be a positive integer, got {n!r}")
    return n


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw initial weights from ``seed`` without touching the global random state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _standard_normal(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """N(0, I) noise of ``shape`` with ``like``'s dtype and device; drawn on the CPU when a
    CPU generator is given, so a seed gives the same numbers on every device."""
    if generator is not None and generator.device.type != like.device.type:
        return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)





class MLP(nn.Module):
    r"""Multilayer perceptron ``(B, in_dim) -> (B, out_dim)``:
    h_0 = x, h_{l+1} = act(W_l h_l + b_l), output = W_L h_L + b_L (no final activation).

    ``hidden`` lists the widths of the hidden layers (empty: a linear map); ``activation``
    is one of ``"silu"``, ``"relu"``, ``"leaky_relu"``, ``"tanh"``, ``"elu"``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "silu",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for label, value in (("in_dim", in_dim), ("out_dim", out_dim), *((f"hidden[{k}]", h) for k, h in enumerate(hidden))):
            _check_count(value, label)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.in_dim, self.out_dim = in_dim, out_dim
        widths = [in_dim, *hidden, out_dim]
        layers: list[nn.Module] = []
        with _seeded(seed):
            for k in range(len(widths) - 1):
                layers.append(nn.Linear(widths[k], widths[k + 1]))
                if k < len(widths) - 2:
                    layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim) -> (B, out_dim)``."""
        return self.net(check_batch(x, self.in_dim))


class Standardizer(nn.Module):
    r"""Affine change of units u = (x - loc) / scale, elementwise, with ``loc`` and ``scale``
    of shape ``(dim,)`` kept as buffers (saved with the model, not trained).

    log |det du/dx| = -Σ_i log scale_i (:attr:`log_det`), so a density q_u of u gives the
    density of x as log q_x(x) = log q_u(u) + log_det.
    """

    loc: Tensor
    scale: Tensor

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        loc = torch.as_tensor(loc, dtype=torch.float32).reshape(-1)
        scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        if loc.shape != scale.shape:
            raise ValueError(f"loc and scale must have the same shape, got {tuple(loc.shape)} and {tuple(scale.shape)}")
        if not bool(torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("loc must be finite and scale finite and positive")
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    @classmethod
    def identity(cls, dim: int) -> "Standardizer":
        """loc = 0, scale = 1."""
        return cls(torch.zeros(_check_count(dim, "dim")), torch.ones(dim))

    @classmethod
    def fit(cls, x: Tensor) -> "Standardizer":
        """loc = mean and scale = standard deviation of data ``(N, dim)``, per coordinate."""
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[0] < 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ModelInputError(f"Standardizer.fit needs data of shape (N >= 2, dim), got {shape}")
        x = x.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise ModelInputError("Standardizer.fit: the data contain NaN or infinite values")
        scale = x.std(0)
        if bool((scale == 0).any()):
            raise ModelInputError("Standardizer.fit: a coordinate is constant over the data (std 0)")
        return cls(x.mean(0), scale)

    @property
    def dim(self) -> int:
        return int(self.loc.shape[0])

    @property
    def log_det(self) -> Tensor:
        """log |det du/dx| = -Σ log scale, a scalar tensor."""
        return -self.scale.log().sum()

    def forward(self, x: Tensor) -> Tensor:
        """x -> u: ``(B, dim) -> (B, dim)``."""
        return (x - self.loc.to(x.dtype)) / self.scale.to(x.dtype)

    def inverse(self, u: Tensor) -> Tensor:
        """u -> x: ``(B, dim) -> (B, dim)``."""
        return u * self.scale.to(u.dtype) + self.loc.to(u.dtype)


# A score network maps (x (B, dim), t (B,)) to s (B, dim), the signature the samplers in
# boltzlab.diffusion expect. t lives in [0, 1] (0: the target, 1: the noise prior).


def _check_times(t: object, x: Tensor) -> Tensor:
    """``t`` must be a floating tensor of shape ``(B,)`` matching ``x`` (B, dim); returns it
    in ``x``'s dtype (a time is just a number, so float32 t with float64 x is fine)."""
    if not isinstance(t, Tensor):
        raise ModelInputError(f"t: expected a torch.Tensor of shape ({x.shape[0]},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise ModelInputError(f"t: expected a floating tensor (float32 or float64), got {t.dtype}")
    if t.shape != (x.shape[0],):
        raise ModelInputError(f"t: expected shape ({x.shape[0]},) (one time per row of x), got {tuple(t.shape)}")
    return t.to(x.dtype)


def _check_dtype(module: nn.Module, x: Tensor) -> None:
    """A clear error instead of torch's matmul dtype mismatch deep inside a layer."""
    p = next(module.parameters(), None)
    if p is not None and p.dtype != x.dtype:
        raise ModelInputError(
            f"x has dtype {x.dtype} but the network's parameters are {p.dtype}; "
            f"convert one of them (e.g. net.double() for float64 input)"
        )


def _check_positive_float(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelInputError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
