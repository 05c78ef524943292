r"""Triton kernels: pair-potential energies and forces, and the fused Monte Carlo score estimator.

Import this module lazily (``boltzlab.kernels`` does): Triton reads ``TRITON_INTERPRET`` when
the ``@triton.jit`` decorators below run, so to run the kernels on CPU tensors with Triton's
interpreter the variable must be ``1`` before the first import (see
:mod:`boltzlab.kernels.interpret`, which does this in a child process).

Tiling. A program holds a tile of R configurations ("rows") x BLOCK_N particles i x BLOCK_N
particles j, BLOCK_N = next power of two >= N. All ordered pairs (i, j), i != j, are evaluated
(padding and the diagonal masked), and the forces on i are a reduction over j in registers:
no atomics, no scatter. Equations: :mod:`boltzlab.kernels.pair_params`; parameters arrive as a
tensor in the positions' dtype, so float64 kernels compute in float64 throughout.

Fused estimator. A program owns BLOCK_B points; its rows are BLOCK_B x BLOCK_K copies. It
loops over the K copies in steps of BLOCK_K: load eps, centre it, form x_t + sigma eps,
evaluate energies and forces, and fold the block into an online logsumexp (running max,
sum of weights, sum of squared weights, weighted force sum and, for the noise form of the
estimate, weighted noise sum; see
:mod:`boltzlab.kernels.online_lse`). Only that state, O(B * dim), is ever written to memory.
The state is read at the start and written at the end, so a long K can be split over launches
(one per noise chunk when the noise comes from a generator).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import triton
import triton.language as tl
from torch import Tensor

from boltzlab.energies import PairPotential
from boltzlab.kernels.estimate import ScoreEstimate, ScoreInputs, finish_estimate
from boltzlab.kernels.noise import NOISE_CHUNK, iter_noise_chunks
from boltzlab.kernels.online_lse import OnlineLSEState
from boltzlab.kernels.pair_params import PairParams

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether these kernels were defined for Triton's CPU interpreter (fixed at import)."""

MAX_PARTICLES = 128
"""Largest N the kernels take: one tile holds all BLOCK_N^2 ordered pairs of a configuration."""

_KIND_CODE = {"lj": 0, "dw": 1}
# tile sizes, in pair elements per program: small on a GPU (each element lives in registers;
# 4096 elements over 8 warps is 16 per thread per tensor), large under the interpreter (its
# cost is per operation, not per element)
_GPU_TILE = 4096
_GPU_WARPS = 8
_INTERPRETER_TILE = 1 << 18


@triton.jit
def _pair_sums(xi, yi, zi, particle_ok, p_ptr, N, KIND: tl.constexpr):
    """Energies (R,) and forces 3 x (R, BLOCK_N) of R configurations with positions (R, BLOCK_N)."""
    pair_factor = tl.load(p_ptr + 0)
    eps = tl.load(p_ptr + 1)
    r_m_sq = tl.load(p_ptr + 2)
    harmonic = tl.load(p_ptr + 3)
    d_min_sq = tl.load(p_ptr + 4)
    tiny_r2 = tl.load(p_ptr + 5)
    clamp_coef = tl.load(p_ptr + 6)
    dw_a = tl.load(p_ptr + 7)
    dw_b = tl.load(p_ptr + 8)
    dw_d0 = tl.load(p_ptr + 9)

    block_n: tl.constexpr = xi.shape[1]
    idx = tl.arange(0, block_n)
    pair_ok = particle_ok[:, None] & particle_ok[None, :] & (idx[:, None] != idx[None, :])
    pair_ok = pair_ok[None, :, :]

    dx = xi[:, :, None] - xi[:, None, :]  # (R, BLOCK_N, BLOCK_N): x_i - x_j
    dy = yi[:, :, None] - yi[:, None, :]
    dz = zi[:, :, None] - zi[:, None, :]
    r2 = dx * dx + dy * dy + dz * dz
    r2 = tl.where(pair_ok, r2, 1.0)  # the diagonal and padding never divide by zero
    if KIND == 0:
        inv_d2 = 1.0 / tl.maximum(r2, d_min_sq)
        s2 = r_m_sq * inv_d2
        s6 = s2 * s2 * s2
        u = eps * (s6 * s6 - 2.0 * s6)
        g_free = 12.0 * pair_factor * eps * (s6 * s6 - s6) * inv_d2
    else:
        d = tl.sqrt(tl.maximum(r2, d_min_sq))
        t = d - dw_d0
        u = dw_a * t * t * t * t + dw_b * t * t
        g_free = -pair_factor * (4.0 * dw_a * t * t * t + 2.0 * dw_b * t) / d
    # clamped pairs push with the force at d_min along x_i - x_j
    g_clamped = clamp_coef / tl.sqrt(tl.maximum(r2, tiny_r2))
    g = tl.where(r2 < d_min_sq, g_clamped, g_free)
    u = tl.where(pair_ok, u, 0.0)
    g = tl.where(pair_ok, g, 0.0)

    energy = 0.5 * pair_factor * tl.sum(tl.sum(u, axis=2), axis=1)
    fx = tl.sum(g * dx, axis=2)
    fy = tl.sum(g * dy, axis=2)
    fz = tl.sum(g * dz, axis=2)

    weight = tl.where(particle_ok, 1.0, 0.0)[None, :]
    cx = (xi - tl.sum(xi * weight, axis=1)[:, None] / N) * weight
    cy = (yi - tl.sum(yi * weight, axis=1)[:, None] / N) * weight
    cz = (zi - tl.sum(zi * weight, axis=1)[:, None] / N) * weight
    energy += 0.5 * harmonic * tl.sum(cx * cx + cy * cy + cz * cz, axis=1)
    return energy, fx - harmonic * cx, fy - harmonic * cy, fz - harmonic * cz


@triton.jit
def _load_xyz(base, mask, SPATIAL_DIM: tl.constexpr):
    """Coordinates at ``base + a`` (particle-major layout); z = 0 for 2-D systems."""
    x = tl.load(base, mask=mask, other=0.0)
    y = tl.load(base + 1, mask=mask, other=0.0)
    if SPATIAL_DIM == 3:
        z = tl.load(base + 2, mask=mask, other=0.0)
    else:
        z = tl.zeros_like(x)
    return x, y, z


@triton.jit
def _store_xyz(base, fx, fy, fz, mask, SPATIAL_DIM: tl.constexpr):
    tl.store(base, fx, mask=mask)
    tl.store(base + 1, fy, mask=mask)
    if SPATIAL_DIM == 3:
        tl.store(base + 2, fz, mask=mask)


@triton.jit
def pair_energy_forces_kernel(
    x_ptr, energy_ptr, forces_ptr, p_ptr, B, N,
    KIND: tl.constexpr, SPATIAL_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """E[b] and F[b, :] for BLOCK_R configurations per program; x, F are (B, N * SPATIAL_DIM)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    idx = tl.arange(0, BLOCK_N)
    row_ok = rows < B
    particle_ok = idx < N
    mask = row_ok[:, None] & particle_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * (N * SPATIAL_DIM) + idx[None, :] * SPATIAL_DIM
    xi, yi, zi = _load_xyz(x_ptr + offsets, mask, SPATIAL_DIM)
    energy, fx, fy, fz = _pair_sums(xi, yi, zi, particle_ok, p_ptr, N, KIND)
    tl.store(energy_ptr + rows, energy, mask=row_ok)
    _store_xyz(forces_ptr + offsets, fx, fy, fz, mask, SPATIAL_DIM)


@triton.jit
def mc_score_kernel(
    xt_ptr, sigma_ptr, eps_ptr, m_ptr, s1_ptr, s2_ptr, acc_ptr, nacc_ptr, p_ptr, B, K, N,
    stride_eps_b, stride_eps_k, stride_eps_i, stride_eps_a,
    KIND: tl.constexpr, SPATIAL_DIM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, NOISE_FORM: tl.constexpr,
):
    """Fold K copies per point into the online-logsumexp state (m, s1, s2, acc[, nacc]).

    x_t (B, dim), sigma (B,), state (B,) x 3 and acc (B, dim) read and written in place;
    with NOISE_FORM, nacc (B, dim) accumulates the weighted centred noise sum_k w_k eps_k
    with the same weights (the noise form of the estimate; nacc_ptr is ignored otherwise);
    dim = N * SPATIAL_DIM. eps[b, k, i, a] sits at b * stride_eps_b + k * stride_eps_k +
    i * stride_eps_i + a * stride_eps_a, so point-major (B, K, dim) and coordinate-major
    (SPATIAL_DIM, N, K, B) noise are read in place. Row r of the tile is copy r % BLOCK_K of
    point r // BLOCK_K of this program.
    """
    ROWS: tl.constexpr = BLOCK_B * BLOCK_K
    dim = N * SPATIAL_DIM
    r = tl.arange(0, ROWS)
    b = tl.program_id(0) * BLOCK_B + r // BLOCK_K
    copy = r % BLOCK_K
    idx = tl.arange(0, BLOCK_N)
    b_ok = b < B
    particle_ok = idx < N
    x_mask = b_ok[:, None] & particle_ok[None, :]
    particle_offsets = idx[None, :] * SPATIAL_DIM
    x0, y0, z0 = _load_xyz(xt_ptr + b[:, None].to(tl.int64) * dim + particle_offsets, x_mask, SPATIAL_DIM)
    sigma = tl.load(sigma_ptr + b, mask=b_ok, other=0.0)[:, None]
    kT = tl.load(p_ptr + 10)

    points = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    point_ok = points < B
    m = tl.load(m_ptr + points, mask=point_ok, other=float("-inf"))
    s1 = tl.load(s1_ptr + points, mask=point_ok, other=0.0)
    s2 = tl.load(s2_ptr + points, mask=point_ok, other=0.0)
    acc_mask = point_ok[:, None] & particle_ok[None, :]
    acc_offsets = points[:, None].to(tl.int64) * dim + particle_offsets
    ax, ay, az = _load_xyz(acc_ptr + acc_offsets, acc_mask, SPATIAL_DIM)
    if NOISE_FORM:
        nx, ny, nz = _load_xyz(nacc_ptr + acc_offsets, acc_mask, SPATIAL_DIM)
    weight = tl.where(particle_ok, 1.0, 0.0)[None, :]

    for k0 in range(0, K, BLOCK_K):
        k = k0 + copy
        row_ok = b_ok & (k < K)
        e_mask = row_ok[:, None] & particle_ok[None, :]
        e_base = eps_ptr + (b.to(tl.int64) * stride_eps_b + k * stride_eps_k)[:, None] + idx[None, :] * stride_eps_i
        ex = tl.load(e_base, mask=e_mask, other=0.0)
        ey = tl.load(e_base + stride_eps_a, mask=e_mask, other=0.0)
        if SPATIAL_DIM == 3:
            ez = tl.load(e_base + 2 * stride_eps_a, mask=e_mask, other=0.0)
        else:
            ez = tl.zeros_like(ex)
        # centre-of-mass-free noise
        ex = (ex - tl.sum(ex, axis=1)[:, None] / N) * weight
        ey = (ey - tl.sum(ey, axis=1)[:, None] / N) * weight
        ez = (ez - tl.sum(ez, axis=1)[:, None] / N) * weight
        energy, fx, fy, fz = _pair_sums(x0 + sigma * ex, y0 + sigma * ey, z0 + sigma * ez,
                                        particle_ok, p_ptr, N, KIND)

        log_w = tl.reshape(tl.where(row_ok, -energy / kT, float("-inf")), (BLOCK_B, BLOCK_K))
        new_m = tl.maximum(m, tl.max(log_w, axis=1))
        shift = tl.where(new_m > float("-inf"), new_m, 0.0)  # rows with only padding so far
        rescale = tl.exp(m - shift)
        w = tl.exp(log_w - shift[:, None])
        s1 = s1 * rescale + tl.sum(w, axis=1)
        s2 = s2 * rescale * rescale + tl.sum(w * w, axis=1)
        w3 = w[:, :, None]
        ax = ax * rescale[:, None] + tl.sum(w3 * tl.reshape(fx, (BLOCK_B, BLOCK_K, BLOCK_N)), axis=1)
        ay = ay * rescale[:, None] + tl.sum(w3 * tl.reshape(fy, (BLOCK_B, BLOCK_K, BLOCK_N)), axis=1)
        az = az * rescale[:, None] + tl.sum(w3 * tl.reshape(fz, (BLOCK_B, BLOCK_K, BLOCK_N)), axis=1)
        if NOISE_FORM:
            nx = nx * rescale[:, None] + tl.sum(w3 * tl.reshape(ex, (BLOCK_B, BLOCK_K, BLOCK_N)), axis=1)
            ny = ny * rescale[:, None] + tl.sum(w3 * tl.reshape(ey, (BLOCK_B, BLOCK_K, BLOCK_N)), axis=1)
            nz = nz * rescale[:, None] + tl.sum(w3 * tl.reshape(ez, (BLOCK_B, BLOCK_K, BLOCK_N)), axis=1)
        m = new_m

    tl.store(m_ptr + points, m, mask=point_ok)
    tl.store(s1_ptr + points, s1, mask=point_ok)
    tl.store(s2_ptr + points, s2, mask=point_ok)
    _store_xyz(acc_ptr + acc_offsets, ax, ay, az, acc_mask, SPATIAL_DIM)
    if NOISE_FORM:
        _store_xyz(nacc_ptr + acc_offsets, nx, ny, nz, acc_mask, SPATIAL_DIM)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _check_device(x: Tensor, params: PairParams) -> None:
    if not x.is_cuda and not INTERPRETED:
        raise RuntimeError(
            "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "boltzlab.kernels.triton_kernels is first imported (see boltzlab.kernels.interpret)"
        )
    if params.n_particles > MAX_PARTICLES:
        raise ValueError(f"the Triton kernels take at most {MAX_PARTICLES} particles, got {params.n_particles}")
    if params.spatial_dim not in (2, 3):
        raise ValueError(f"the Triton kernels take 2-D or 3-D particles, got spatial_dim={params.spatial_dim}")


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def pair_energy_forces_triton(potential: PairPotential, x: Tensor, block_rows: int | None = None) -> tuple[Tensor, Tensor]:
    """E (B,) and F (B, dim) of x (B, dim) with :func:`pair_energy_forces_kernel`.

    ``block_rows`` (a power of two) sets configurations per program; by default a tile of
    about 4096 pair elements on a GPU and all of B (up to a large tile) under the interpreter.
    """
    params = PairParams.from_potential(potential)
    _check_device(x, params)
    x = x.contiguous()
    batch = x.shape[0]
    block_n = triton.next_power_of_2(params.n_particles)
    tile = _INTERPRETER_TILE if INTERPRETED else _GPU_TILE
    if block_rows is None:
        block_rows = min(triton.next_power_of_2(batch), _pow2_at_most(max(1, tile // block_n**2)))
    energy = torch.empty(batch, dtype=x.dtype, device=x.device)
    forces = torch.empty_like(x)
    grid = (triton.cdiv(batch, block_rows),)
    pair_energy_forces_kernel[grid](
        x, energy, forces, params.as_tensor(x.dtype, x.device), batch, params.n_particles,
        KIND=_KIND_CODE[params.kind], SPATIAL_DIM=params.spatial_dim, BLOCK_R=block_rows, BLOCK_N=block_n,
        num_warps=_GPU_WARPS,
    )
    return energy, forces


def score_estimate_triton(
    potential: PairPotential,
    inputs: ScoreInputs,
    generator: torch.Generator | None,
    block_points: int | None = None,
    block_copies: int | None = None,
    noise_form: bool = False,
) -> ScoreEstimate:
    """The fused estimator with :func:`mc_score_kernel` (see :func:`boltzlab.kernels.mc_score_estimate`).

    One launch over all K when ``inputs.noise`` is given; otherwise one launch per noise chunk,
    the state carried between launches. ``block_points`` and ``block_copies`` (powers of two)
    set the tile; by default BLOCK_B = 1 on a GPU (one program per point) and as many points
    as fit one large tile under the interpreter.
    """
    params = PairParams.from_potential(potential)
    x_t = inputs.x_t.contiguous()
    _check_device(x_t, params)
    batch, dim, dtype, device = inputs.batch, params.dim, x_t.dtype, x_t.device
    block_n = triton.next_power_of_2(params.n_particles)
    tile = _INTERPRETER_TILE if INTERPRETED else _GPU_TILE
    rows = _pow2_at_most(max(1, tile // block_n**2))
    k_max = inputs.n_samples if inputs.noise is not None else min(NOISE_CHUNK, inputs.n_samples)
    if block_points is None:
        block_points = min(triton.next_power_of_2(batch), rows) if INTERPRETED else 1
    if block_copies is None:
        block_copies = max(1, min(triton.next_power_of_2(k_max), rows // block_points))
    for name, value in (("block_points", block_points), ("block_copies", block_copies)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")

    state = OnlineLSEState.empty(batch, dim, dtype, device)
    weighted_noise = torch.zeros(batch, dim, dtype=dtype, device=device) if noise_form else state.weighted_sum
    p = params.as_tensor(dtype, device)
    grid = (triton.cdiv(batch, block_points),)
    n, d = params.n_particles, params.spatial_dim
    chunks: Iterable[tuple[Tensor, tuple[int, int, int, int]]]
    if inputs.noise is not None:  # point-major (B, K, N, d), one launch
        chunks = [(inputs.noise.contiguous().view(batch, inputs.n_samples, n, d), (0, 1, 2, 3))]
    else:  # coordinate-major (d, N, k_c, B) chunks, drawn one at a time, one launch each
        chunks = ((c, (3, 2, 1, 0)) for c in iter_noise_chunks(
            potential, batch, inputs.n_samples, generator=generator, dtype=dtype, device=device))
    for eps, axes in chunks:
        strides = [eps.stride(axis) for axis in axes]  # (b, k, i, a)
        mc_score_kernel[grid](
            x_t, inputs.sigma, eps, state.max_log_weight, state.sum_weights,
            state.sum_sq_weights, state.weighted_sum, weighted_noise, p, batch, eps.shape[axes[1]], n, *strides,
            KIND=_KIND_CODE[params.kind], SPATIAL_DIM=params.spatial_dim,
            BLOCK_B=block_points, BLOCK_K=block_copies, BLOCK_N=block_n, NOISE_FORM=noise_form,
            num_warps=_GPU_WARPS,
        )
    if noise_form:
        state = OnlineLSEState(state.max_log_weight, state.sum_weights, state.sum_sq_weights,
                               torch.cat([state.weighted_sum, weighted_noise], dim=1))
        return finish_estimate(state, potential.kT, inputs.n_samples, inputs.sigma)
    return finish_estimate(state, potential.kT, inputs.n_samples)

