r"""The Gaussian perturbations eps_k of the Monte Carlo score estimator.

With a ``torch.Generator``, the noise of B points and K copies is defined chunk by chunk:
chunk c holds copies ``64 c ... 64 c + k_c - 1`` (k_c = 64 except for the last chunk) and is
drawn as one ``torch.randn`` call in *coordinate-major* order,

    particle systems (n particles in d dimensions):  randn(d, n, k_c, B, generator=g)
    plain vectors (dim coordinates):                 randn(dim, k_c, B, generator=g)

so that eps[b, 64 c + k, i * d + a] = chunk[a, i, k, b]. Coordinate-major is the layout the
fast CPU path computes in (SIMD lanes run over points and copies), so it can use a chunk
without transposing it, and a block of copies k0..k1 for all points is contiguous. Every path draws the noise this way: the reference materialises all chunks
(:func:`draw_noise`), the streaming paths hold one chunk at a time (memory O(B * 64 * dim),
not O(B * K * dim)), and all of them see the same numbers for the same generator state.

For particle systems the noise is projected onto the centre-of-mass-free subspace,
eps_i <- eps_i - (1/n) sum_j eps_j, so the perturbed copies stay there.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from boltzlab.energies import Energy, remove_com

NOISE_CHUNK = 64
"""Copies per noise chunk drawn from a generator (part of the definition of the noise)."""


def coordinate_layout(energy: Energy) -> tuple[int, ...]:
    """(d, n) for particle systems, (dim,) otherwise: the leading axes of a noise chunk."""
    if energy.is_particle_system:
        assert energy.n_particles is not None and energy.spatial_dim is not None
        return (energy.spatial_dim, energy.n_particles)
    return (energy.dim,)


def iter_noise_chunks(
    energy: Energy,
    batch: int,
    n_samples: int,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Iterator[Tensor]:
    """Yield the coordinate-major chunks, shape ``(*coordinate_layout(energy), k_c, batch)``, on ``device``.

    Drawn on the generator's device (the global RNG of ``device`` when ``generator`` is None).
    """
    layout = coordinate_layout(energy)
    draw_device = generator.device if generator is not None else device
    for k0 in range(0, n_samples, NOISE_CHUNK):
        k_c = min(NOISE_CHUNK, n_samples - k0)
        chunk = torch.randn(*layout, k_c, batch, generator=generator, dtype=dtype, device=draw_device)
        yield chunk.to(device)


def point_major(chunk: Tensor) -> Tensor:
    """A coordinate-major chunk ``(*layout, k, B)`` as ``(B, k, dim)`` (a copy), dim index i * d + a."""
    return chunk.permute(*reversed(range(chunk.ndim))).reshape(chunk.shape[-1], chunk.shape[-2], -1)


def draw_noise(
    energy: Energy,
    batch: int,
    n_samples: int,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """All the noise at once, ``(batch, n_samples, dim)``: the chunks of :func:`iter_noise_chunks`
    in point-major order, concatenated along K (not projected)."""
    chunks = iter_noise_chunks(energy, batch, n_samples, generator=generator, dtype=dtype,
                               device=torch.device(device))
    return torch.cat([point_major(c) for c in chunks], dim=1)


def project_noise(noise: Tensor, energy: Energy) -> Tensor:
    """Remove the centre of mass of each particle-system noise vector, ``(..., dim) -> (..., dim)``;
    plain vectors are returned unchanged."""
    if not energy.is_particle_system:
        return noise
    assert energy.n_particles is not None and energy.spatial_dim is not None
    return remove_com(noise, energy.n_particles, energy.spatial_dim)
