r"""Small neural networks for generative models of configurations (chapter 01 onwards).

Every model maps tensors of shape ``(B, dim)`` (a batch of configurations or latent codes)
and is built from :class:`MLP`. Models that see data hold a :class:`Standardizer` so that
their inputs and outputs are in the data's own units while the network works on values
of order one (GMM-40 spans about ±40; an MLP on raw coordinates trains badly).

==============================  ===========================================================
:class:`MLP`                    a plain multilayer perceptron ``(B, in) -> (B, out)``
:class:`Standardizer`           u = (x - loc) / scale and back, with its log-Jacobian
:class:`GaussianEncoder`        q(z | x) = N(mu(x), diag exp(log_var(x)))
:class:`GaussianDecoder`        p(x | z) = N(mean(z), diag sigma^2), sigma learned globally
:class:`AutoregressiveMixtureDecoder`
                                p(x | z) = prod_i sum_k pi_k N(x_i; m_k, s_k^2), each
                                conditional given (z, x_<i): strong enough to model p(x)
                                without z (posterior collapse)
:class:`VAE`                    encoder + decoder + prior N(0, I) + standardizer
:class:`Generator`              GAN generator x = G(z), z ~ N(0, I)
:class:`Discriminator`          GAN discriminator: logits D(x) (probability sigmoid(D(x)))
:class:`Critic`                 WGAN critic: an unbounded score f(x)
:class:`SinusoidalTimeEmbedding`
                                sin/cos features of a diffusion time t in [0, 1]
:class:`ScoreMLP`               time-conditioned score s(x, t) ``(B, dim), (B,) -> (B, dim)``
:class:`EnergyMLP`              time-conditioned energy E(x, t) ``-> (B,)``
:class:`EnergyScore`            s = -∇_x E(x, t) / kT, differentiable for training (NEM)
:class:`EGNNLayer`              one E(n)-equivariant message-passing layer on all pairs
:class:`EGNN`                   E(n) x S_n-equivariant, COM-free score network for particles
==============================  ===========================================================

Every constructor that creates weights takes ``seed``: when given, they are drawn from
``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so two models built
with the same seed are identical and the global random state is left untouched.
Losses and training loops are in :mod:`boltzlab.training`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from boltzlab.kernels.cpu import neighbour_table
from boltzlab.validation import check_points

__all__ = [
    "ModelInputError",
    "MLP",
    "Standardizer",
    "GaussianEncoder",
    "GaussianDecoder",
    "AutoregressiveMixtureDecoder",
    "VAE",
    "Generator",
    "Discriminator",
    "Critic",
]

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


# ----------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------


class GaussianEncoder(nn.Module):
    r"""Amortised posterior q(z | x) = N(z; mu(x), diag exp(log_var(x))).

    ``forward(x)`` maps ``(B, x_dim)`` to ``(mu, log_var)``, each ``(B, z_dim)``.
    """

    def __init__(self, x_dim: int, z_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "silu", seed: int | None = None) -> None:
        super().__init__()
        self.x_dim, self.z_dim = _check_count(x_dim, "x_dim"), _check_count(z_dim, "z_dim")
        self.net = MLP(x_dim, 2 * z_dim, hidden, activation, seed)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, x_dim) -> (mu (B, z_dim), log_var (B, z_dim))``."""
        mu, log_var = self.net(check_batch(x, self.x_dim)).chunk(2, dim=-1)
        return mu, log_var


class GaussianDecoder(nn.Module):
    r"""p(x | z) = N(x; mean(z), diag sigma^2) with ``mean`` an MLP and log sigma^2 one
    learned number per coordinate, shared by all z (homoscedastic noise).

    ``forward(z)`` maps ``(B, z_dim)`` to ``(mean, log_var)``, each ``(B, x_dim)``.
    :meth:`log_prob` gives
    log p(x | z) = -1/2 Σ_i [ (x_i - mean_i)^2 / sigma_i^2 + log sigma_i^2 + log 2π ], ``(B,)``.
    """

    def __init__(self, z_dim: int, x_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "silu", init_log_var: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        self.z_dim, self.x_dim = _check_count(z_dim, "z_dim"), _check_count(x_dim, "x_dim")
        self.net = MLP(z_dim, x_dim, hidden, activation, seed)
        self.log_var = nn.Parameter(torch.full((x_dim,), float(init_log_var)))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, z_dim) -> (mean (B, x_dim), log_var (B, x_dim))``."""
        mean = self.net(check_batch(z, self.z_dim, "z"))
        return mean, self.log_var.to(mean.dtype).expand_as(mean)

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z): x ``(B, x_dim)``, z ``(B, z_dim)`` -> ``(B,)``."""
        mean, log_var = self(z)
        check_batch(x, self.x_dim)
        return -0.5 * (((x - mean) ** 2) * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)

    def sample(self, z: Tensor, generator: torch.Generator | None = None, noise: bool = True) -> Tensor:
        """x ~ p(x | z), ``(B, z_dim) -> (B, x_dim)``; ``noise=False`` returns the mean."""
        mean, log_var = self(z)
        if not noise:
            return mean
        return mean + torch.exp(0.5 * log_var) * _standard_normal(tuple(mean.shape), mean, generator)


class AutoregressiveMixtureDecoder(nn.Module):
    r"""p(x | z) = Π_i p(x_i | z, x_<i), each conditional a mixture of K Gaussians,

        p(x_i | z, x_<i) = Σ_k π_k N(x_i; m_k, s_k^2),

    with (logits of π, m, log s), each ``(B, K)``, from one MLP per coordinate i whose input
    is (z, x_1, ..., x_{i-1}). Such a decoder can fit a multimodal p(x) with z ignored,
    which is what makes posterior collapse the optimum (chapter 01).
    """

    def __init__(self, z_dim: int, x_dim: int, n_components: int = 8, hidden: Sequence[int] = (64, 64),
                 activation: str = "silu", seed: int | None = None) -> None:
        super().__init__()
        self.z_dim, self.x_dim = _check_count(z_dim, "z_dim"), _check_count(x_dim, "x_dim")
        self.n_components = _check_count(n_components, "n_components")
        with _seeded(seed):
            self.conditionals = nn.ModuleList(
                MLP(z_dim + i, 3 * n_components, hidden, activation) for i in range(x_dim)
            )

    def _mixture(self, i: int, z: Tensor, x_before: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log π (B, K) normalised, means (B, K), log stds (B, K)) of p(x_i | z, x_<i)."""
        logits, means, log_std = self.conditionals[i](torch.cat([z, x_before], dim=-1)).chunk(3, dim=-1)
        # soft floor on the width: a component may not shrink onto a single training point
        log_std = -5.0 + nn.functional.softplus(log_std + 5.0)
        return torch.log_softmax(logits, dim=-1), means, log_std

    def log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x | z): x ``(B, x_dim)``, z ``(B, z_dim)`` -> ``(B,)``."""
        check_batch(x, self.x_dim)
        check_batch(z, self.z_dim, "z")
        total = x.new_zeros(x.shape[0])
        for i in range(self.x_dim):
            log_pi, means, log_std = self._mixture(i, z, x[:, :i])
            t = (x[:, i : i + 1] - means) * torch.exp(-log_std)
            log_comp = -0.5 * (t**2 + LOG_2PI) - log_std
            total = total + torch.logsumexp(log_pi + log_comp, dim=-1)
        return total

    def sample(self, z: Tensor, generator: torch.Generator | None = None, noise: bool = True) -> Tensor:
        """x ~ p(x | z) coordinate by coordinate, ``(B, z_dim) -> (B, x_dim)``.
        ``noise=False`` takes each conditional's most probable component's mean."""
        check_batch(z, self.z_dim, "z")
        x = z.new_zeros(z.shape[0], 0)
        for i in range(self.x_dim):
            log_pi, means, log_std = self._mixture(i, z, x)
            if noise:
                u = torch.rand(z.shape[0], generator=generator).to(z)
                k = torch.searchsorted(torch.cumsum(log_pi.exp(), -1).detach(), u[:, None]).clamp_max(self.n_components - 1)
                eps = _standard_normal((z.shape[0], 1), z, generator)
                xi = means.gather(1, k) + log_std.gather(1, k).exp() * eps
            else:
                xi = means.gather(1, log_pi.argmax(-1, keepdim=True))
            x = torch.cat([x, xi], dim=-1)
        return x


class VAE(nn.Module):
    r"""Variational autoencoder: prior p(z) = N(0, I), decoder p(x | z), encoder q(z | x).

    The encoder and decoder work on standardised coordinates u = (x - loc) / scale
    (``standardizer``; identity by default); :meth:`sample` returns data units. The ELBO,
    in data units, is in :func:`boltzlab.training.elbo`.

    ``decoder`` is any module with ``log_prob(u, z) -> (B,)`` and
    ``sample(z, generator, noise) -> (B, x_dim)``: a :class:`GaussianDecoder` or an
    :class:`AutoregressiveMixtureDecoder`.
    """

    def __init__(self, encoder: GaussianEncoder, decoder: nn.Module, standardizer: Standardizer | None = None) -> None:
        super().__init__()
        if encoder.z_dim != decoder.z_dim or encoder.x_dim != decoder.x_dim:
            raise ValueError(
                f"encoder maps x_dim={encoder.x_dim} to z_dim={encoder.z_dim} but decoder maps "
                f"z_dim={decoder.z_dim} to x_dim={decoder.x_dim}"
            )
        self.encoder, self.decoder = encoder, decoder
        self.standardizer = standardizer if standardizer is not None else Standardizer.identity(encoder.x_dim)
        if self.standardizer.dim != encoder.x_dim:
            raise ValueError(f"standardizer has dim {self.standardizer.dim}, the encoder expects {encoder.x_dim}")

    @property
    def x_dim(self) -> int:
        return self.encoder.x_dim

    @property
    def z_dim(self) -> int:
        return self.encoder.z_dim

    @classmethod
    def gaussian(cls, x_dim: int, z_dim: int, hidden: Sequence[int] = (64, 64), data: Tensor | None = None,
                 activation: str = "silu", seed: int | None = None) -> "VAE":
        """Gaussian encoder and Gaussian (homoscedastic) decoder; standardised on ``data`` if given."""
        with _seeded(seed):
            enc = GaussianEncoder(x_dim, z_dim, hidden, activation)
            dec = GaussianDecoder(z_dim, x_dim, hidden, activation)
        return cls(enc, dec, Standardizer.fit(data) if data is not None else None)

    @classmethod
    def autoregressive(cls, x_dim: int, z_dim: int, hidden: Sequence[int] = (64, 64), n_components: int = 8,
                       data: Tensor | None = None, activation: str = "silu", seed: int | None = None) -> "VAE":
        """Gaussian encoder and :class:`AutoregressiveMixtureDecoder` (a too-strong decoder)."""
        with _seeded(seed):
            enc = GaussianEncoder(x_dim, z_dim, hidden, activation)
            dec = AutoregressiveMixtureDecoder(z_dim, x_dim, n_components, hidden, activation)
        return cls(enc, dec, Standardizer.fit(data) if data is not None else None)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z | x) of data ``(B, x_dim)``: ``(mu, log_var)``, each ``(B, z_dim)``."""
        return self.encoder(self.standardizer(check_batch(x, self.x_dim)))

    def decode(self, z: Tensor, generator: torch.Generator | None = None, noise: bool = True) -> Tensor:
        """x ~ p(x | z) in data units, ``(B, z_dim) -> (B, x_dim)`` (``noise=False``: the mean)."""
        return self.standardizer.inverse(self.decoder.sample(z, generator=generator, noise=noise))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, noise: bool = True) -> Tensor:
        """n samples of the model p(x) = ∫ p(z) p(x | z) dz in data units, ``(n, x_dim)``:
        z ~ N(0, I), then x ~ p(x | z) (``noise=False``: the decoder's mean, x = mean(z))."""
        ref = self.standardizer.loc
        z = _standard_normal((_check_count(n), self.z_dim), ref, generator)
        return self.decode(z, generator, noise)


# ----------------------------------------------------------------------------------------
# GAN
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# score networks for diffusion samplers (chapters 06 and 08)
# ----------------------------------------------------------------------------------------
#
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


class EGNNLayer(nn.Module):
    r"""One E(n)-equivariant graph layer (Satorras, Hoogeboom & Welling 2021) on a fully
    connected graph of n particles: ``h (B, n, hidden), x (B, n, d) -> (h', x')``.

    For every ordered pair i != j, with d_ij^2 = |x_i - x_j|^2,

        m_ij  = phi_e([h_i, h_j, d_ij^2])                                   (B, n, n-1, hidden)
        x_i'  = x_i + 1/(n-1) Σ_{j≠i} (x_i - x_j) / sqrt(d_ij^2 + 1) · phi_x(m_ij)
        h_i'  = h_i + phi_h([h_i, 1/(n-1) Σ_{j≠i} m_ij])                    (if update_features)

    phi_e, phi_h: two linear layers with SiLU; phi_x: SiLU MLP to one number per pair.
    Only invariants (h, d^2) enter the MLPs and x changes along difference vectors, so for
    any orthogonal R (rotations and reflections), translation b and permutation P,

        layer(h, R x + b) = (h', R x' + b),   layer(P h, P x) = (P h', P x').

    The 1/(n-1) and 1/sqrt(d_ij^2 + 1) factors keep the update bounded as n and the distances
    grow (|x_i - x_j| / sqrt(d_ij^2 + 1) < 1), and the latter is smooth at d_ij = 0.
    phi_e([h_i, h_j, d^2]) is computed as A h_i + B h_j + c d^2 + bias with (A, B, c) the
    blocks of one ``nn.Linear(2 hidden + 1, hidden)``: the same function without building
    the (B, n, n-1, 2 hidden + 1) concatenation; and only the n (n - 1) pairs are built. ``update_features=False`` (the last layer of
    :class:`EGNN`, whose features are never read) leaves h unchanged and has no phi_h.
    """

    def __init__(self, hidden: int, update_features: bool = True) -> None:
        super().__init__()
        self.hidden = _check_count(hidden, "hidden")
        self.update_features = bool(update_features)
        self.edge_in = nn.Linear(2 * hidden + 1, hidden)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.node_mlp = (
            nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            if update_features else None
        )

    def forward(self, h: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """``h (B, n, hidden), x (B, n, d) -> (h' (B, n, hidden), x' (B, n, d))``."""
        if not isinstance(h, Tensor) or h.ndim != 3 or h.shape[-1] != self.hidden:
            raise ModelInputError(f"h: expected shape (B, n, {self.hidden}), got {tuple(getattr(h, 'shape', ()))}")
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[:2] != h.shape[:2]:
            raise ModelInputError(
                f"x: expected shape (B, n, d) with (B, n) = {tuple(h.shape[:2])}, got {tuple(getattr(x, 'shape', ()))}"
            )
        n = x.shape[1]
        if n < 2:
            raise ModelInputError(f"an EGNN layer needs at least 2 particles, got {n}")
        # only the n (n - 1) pairs j != i: the i = i terms are zero in every sum, so leaving them
        # out changes nothing but the work (measured 11% of a training step for 13 particles)
        others = neighbour_table(n, x.device)                           # (n, n-1): the j != i
        diff = x[:, :, None, :] - x[:, others, :]                       # (B, n, n-1, d): x_i - x_j
        d2 = diff.pow(2).sum(-1, keepdim=True)                          # (B, n, n-1, 1)
        w = self.edge_in.weight
        H = self.hidden
        pre = (
            nn.functional.linear(h, w[:, :H])[:, :, None, :]            # A h_i
            + nn.functional.linear(h, w[:, H:2 * H])[:, others, :]      # B h_j
            + d2 * w[:, 2 * H]                                          # c d_ij^2
            + self.edge_in.bias
        )
        m = self.edge_out(pre)                                          # (B, n, n-1, H)
        # sqrt(d^2 + 1) rather than d + 1: as bounded, and smooth at d = 0 (d itself has an
        # infinite derivative there, which turns coincident particles into NaN gradients)
        coef = self.coord_mlp(m) / (d2 + 1.0).sqrt()                    # (B, n, n-1, 1)
        x_new = x + (diff * coef).sum(2) / (n - 1)
        if self.node_mlp is None:
            return h, x_new
        agg = m.sum(2) / (n - 1)                                        # (B, n, H)
        return h + self.node_mlp(torch.cat([h, agg], dim=-1)), x_new


class EGNN(nn.Module):
    r"""E(n)-equivariant score network for n identical particles in d dimensions:
    ``x (B, n d), t (B,) -> s (B, n d)``.

        h_i^0 = W phi(t) + b          (the same for every particle: no particle identities,
                                       so the network is permutation equivariant)
        (h^l, x^l) = EGNNLayer_l(h^{l-1}, x^{l-1}),   l = 1, ..., n_layers,   x^0 = x
        s_i = (x_i^L - x_i^0) - 1/n Σ_j (x_j^L - x_j^0)

    The output is a displacement, so it is translation invariant and rotates/reflects with
    x: s(R x + b, t) = R s(x, t), s(P x, t) = P s(x, t); and it is centre-of-mass free
    (Σ_i s_i = 0). Time enters through the node features, hence every message. The graph
    is fully connected and everything is vectorised over the batch and the pairs
    (memory O(B n^2 hidden)). Works in float32 or float64 (``.double()``).
    """

    def __init__(self, n_particles: int, spatial_dim: int, hidden: int = 64, n_layers: int = 4,
                 time_dim: int = 32, *, max_period: float = 1000.0, seed: int | None = None) -> None:
        super().__init__()
        self.n_particles = _check_count(n_particles, "n_particles")
        if n_particles < 2:
            raise ModelInputError(f"n_particles must be at least 2, got {n_particles}")
        self.spatial_dim = _check_count(spatial_dim, "spatial_dim")
        self.dim = n_particles * spatial_dim
        self.hidden, self.n_layers = _check_count(hidden, "hidden"), _check_count(n_layers, "n_layers")
        self.time_dim = _check_count(time_dim, "time_dim")
        self.time_embedding = SinusoidalTimeEmbedding(time_dim, max_period)
        with _seeded(seed):
            self.embed = nn.Linear(time_dim, hidden)
            self.layers = nn.ModuleList(
                EGNNLayer(hidden, update_features=k < n_layers - 1) for k in range(n_layers)
            )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x (B, n_particles * spatial_dim), t (B,) -> s (B, n_particles * spatial_dim)``."""
        x = check_batch(x, self.dim)
        t = _check_times(t, x)
        _check_dtype(self, x)
        B = x.shape[0]
        r0 = x.reshape(B, self.n_particles, self.spatial_dim)
        h = self.embed(self.time_embedding(t))[:, None, :].expand(B, self.n_particles, self.hidden)
        r = r0
        for layer in self.layers:
            h, r = layer(h, r)
        out = r - r0
        return (out - out.mean(dim=1, keepdim=True)).reshape(B, self.dim)


__all__ += ["EGNN", "EGNNLayer", "EnergyMLP", "EnergyScore", "ScoreMLP", "SinusoidalTimeEmbedding"]
