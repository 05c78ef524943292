r"""Variational autoencoders (chapter 01): :class:`GaussianEncoder`, :class:`GaussianDecoder`,
:class:`AutoregressiveMixtureDecoder` and :class:`VAE` (encoder + decoder + prior N(0, I) +
standardizer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzlab.models.blocks import (
    LOG_2PI,
    MLP,
    Standardizer,
    _check_count,
    _seeded,
    _standard_normal,
    check_batch,
)


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
