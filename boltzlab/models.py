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
==============================  ===========================================================

Every constructor that creates weights takes ``seed``: when given, they are drawn from
``torch.manual_seed(seed)`` inside :func:`torch.random.fork_rng`, so two models built
with the same seed are identical and the global random state is left untouched.
Losses and training loops are in :mod:`boltzlab.training`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

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
