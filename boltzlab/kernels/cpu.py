r"""The fast PyTorch path (CPU tensors, and any pair potential the Triton kernels do not take).

Layout. A block of M configurations is stored coordinate-major, ``X[a, i, m]`` of shape
(d, N, M), so every elementwise operation runs along the contiguous M axis (SIMD lanes =
different configurations). Each particle i meets its N - 1 neighbours through a fixed table
``nbr`` (N, N-1); the forces are a reduction over that axis (each pair is evaluated from both
ends: twice the arithmetic of a scatter over unique pairs, but no scatter, so it is
thread-safe and vectorises). Equations: :mod:`boltzlab.kernels.pair_params`.

Blocking. The score estimator walks over the noise chunk by chunk (:mod:`.noise`) and, inside
a chunk, over blocks of ``block_points`` points x ``block_copies`` copies, chosen so a block
holds about :data:`PAIRS_PER_BLOCK` (compiled) or :data:`EAGER_PAIRS_PER_BLOCK` pairs (cache-sized).
Each block's log-weights and forces are folded into an online logsumexp
(:mod:`.online_lse`), so memory is O(B * dim) for the state plus one block.

Speed. The two block functions are compiled with ``torch.compile`` when it pays off
(see :func:`use_compile`); with ``compile=False`` the same code runs eagerly. Ragged blocks are
padded (padding copies get log-weight -inf), so a call compiles at most one shape.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Callable, Iterator

import torch
from torch import Tensor

from boltzlab.energies import Energy, PairPotential
from boltzlab.kernels.estimate import ScoreEstimate, ScoreInputs, finish_estimate
from boltzlab.kernels.noise import NOISE_CHUNK, coordinate_layout, iter_noise_chunks, point_major, project_noise
from boltzlab.kernels.online_lse import OnlineLSEState, fold_block, online_lse_update
from boltzlab.kernels.pair_params import PairParams

PAIRS_PER_BLOCK = 1 << 19
"""Target unique pairs per block when compiled (about 2 MB per float32 (N, N-1, M) temporary:
the compiled loops keep most temporaries in registers, so this is sized for L2/L3)."""

EAGER_PAIRS_PER_BLOCK = 1 << 16
"""The same for eager mode, where every operation writes a full temporary: smaller blocks keep
them in the L2 cache (measured fastest on LJ-13 and LJ-55 among 2^14, 2^16, 2^19)."""

AUTO_COMPILE_MIN_PAIRS = 10_000_000
"""With ``compile=None``, compile when a call evaluates at least this many pairs."""

GENERIC_COPIES_PER_BLOCK = 4096
"""Copies evaluated at once by the path for energies other than pair potentials."""

COMPILE_ENV_VAR = "BOLTZLAB_COMPILE"
"""``0`` never compiles, ``1`` always compiles, unset or ``auto`` uses the size rule."""

_RECOMPILE_LIMIT = 64


# ----------------------------------------------------------------------------------------
# Block functions (compiled or eager)
# ----------------------------------------------------------------------------------------


_NEIGHBOUR_TABLES: dict[int, Tensor] = {}


def _neighbour_table_cpu(n: int) -> Tensor:
    # a plain dict, not functools.lru_cache: torch.compile traces through an lru_cache with a
    # warning on every compiled caller (the table is a constant either way)
    if n not in _NEIGHBOUR_TABLES:
        idx = torch.arange(n)
        _NEIGHBOUR_TABLES[n] = torch.stack([torch.cat([idx[:i], idx[i + 1:]]) for i in range(n)])
    return _NEIGHBOUR_TABLES[n]


def neighbour_table(n: int, device: torch.device) -> Tensor:
    """``nbr`` (n, n - 1), long: row i lists the particles j != i in increasing order."""
    return _neighbour_table_cpu(n).to(device)


def pair_block(x: Tensor, nbr: Tensor, params: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Energies and forces of M configurations in coordinate-major layout.

    ``x`` (d, N, M) contiguous; ``nbr`` (N, N-1); ``params`` from :meth:`PairParams.as_tensor`;
    ``kind`` "lj" or "dw". Returns E (M,) and F (d, N, M).
    """
    (pair_factor, eps, r_m_sq, harmonic, d_min_sq, tiny_r2, clamp_coef,
     dw_a, dw_b, dw_d0, _kT) = params.unbind()
    # one (N, N-1, M) tensor per coordinate, x_i - x_j: keeping d^2 a sum of pointwise
    # terms (not a reduction) lets the compiler fuse the pair arithmetic into the force loop
    rij = [xa[:, None, :] - xa[nbr] for xa in x.unbind(0)]
    r2 = rij[0] * rij[0]
    for ra in rij[1:]:
        r2 = r2 + ra * ra
    if kind == "lj":
        inv_d2 = 1.0 / torch.maximum(r2, d_min_sq)
        s6 = (r_m_sq * inv_d2) ** 3
        u = eps * (s6 * s6 - 2.0 * s6)
        g_free = (12.0 * pair_factor * eps) * (s6 * s6 - s6) * inv_d2
    else:
        d = torch.sqrt(torch.maximum(r2, d_min_sq))
        t = d - dw_d0
        u = dw_a * t**4 + dw_b * t**2
        g_free = -pair_factor * (4.0 * dw_a * t**3 + 2.0 * dw_b * t) / d
    # clamped pairs push with the force at d_min along x_i - x_j (see pair_params)
    g = torch.where(r2 < d_min_sq, clamp_coef * torch.rsqrt(torch.maximum(r2, tiny_r2)), g_free)
    energy = (0.5 * pair_factor) * u.sum(1).sum(0)
    forces = torch.stack([(g * ra).sum(1) for ra in rij])
    centred = x - x.mean(1, keepdim=True)
    energy = energy + (0.5 * harmonic) * (centred * centred).sum((0, 1))
    forces = forces - harmonic * centred
    return energy, forces


def prepare_block(x_t: Tensor, sigma: Tensor, noise: Tensor, project: bool) -> tuple[Tensor, Tensor]:
    """Perturbed copies in coordinate-major layout, and the noise that made them.

    ``x_t`` (d, N, b), ``sigma`` (b,), ``noise`` (d, N, k, b) (a coordinate-major noise block,
    see :mod:`.noise`) -> X (d, N, k * b) contiguous with
    X[:, :, c * b + p] = x_t[:, :, p] + sigma[p] * eps[:, :, c, p] (eps centred over N if
    ``project``), and that eps as (d, N, k * b) (a view where possible).
    """
    if project:
        noise = noise - noise.mean(1, keepdim=True)
    copies = x_t[:, :, None, :] + sigma * noise
    d, n = x_t.shape[0], x_t.shape[1]
    return copies.reshape(d, n, -1).contiguous(), noise.reshape(d, n, -1)


def pairs_and_fold(
    x: Tensor, eps: Tensor | None, valid: Tensor, nbr: Tensor, params: Tensor, kind: str,
    max_log_weight: Tensor, sum_weights: Tensor, sum_sq_weights: Tensor, weighted_sum: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Evaluate a block of b * k copies and fold it into the online-logsumexp state.

    ``x`` (d, N, k * b) and ``eps`` (d, N, k * b) or None from :func:`prepare_block`,
    ``valid`` (b, k) bool; the state's ``weighted_sum`` is (b, d * N) in coordinate-major order
    (index a * N + i), or (b, 2 d * N) with the weighted noise after the forces when ``eps``
    is given (the noise form of the estimate shares the weights, so one fold serves both).
    """
    energy, forces = pair_block(x, nbr, params, kind)
    b, k = valid.shape
    kT = params[-1]
    log_w = torch.where(valid, -energy.reshape(k, b).T / kT, torch.full_like(valid, -math.inf, dtype=x.dtype))
    if eps is not None:
        forces = torch.cat([forces, eps])
    values = forces.reshape(-1, k, b).permute(2, 1, 0)  # (b, k, d * N) or (b, k, 2 d * N), a view
    return online_lse_update(max_log_weight, sum_weights, sum_sq_weights, weighted_sum, log_w, values)


# ----------------------------------------------------------------------------------------
# torch.compile management
# ----------------------------------------------------------------------------------------

_compile_failed = False


def compile_available() -> bool:
    """False once torch.compile has failed in this process (the CPU path then runs eagerly)."""
    return not _compile_failed


def use_compile(compile: bool | None, n_pairs: int) -> bool:
    """Decide whether to compile: an explicit bool wins, then ``BOLTZLAB_COMPILE``, then the
    rule "at least :data:`AUTO_COMPILE_MIN_PAIRS` pairs in this call"."""
    if _compile_failed:
        return False
    if compile is not None:
        return bool(compile)
    setting = compile_env_setting()
    return setting if setting is not None else n_pairs >= AUTO_COMPILE_MIN_PAIRS


def compile_env_setting() -> bool | None:
    """``BOLTZLAB_COMPILE``: False for 0/false/no, True for 1/true/yes, None when unset or "auto"."""
    env = os.environ.get(COMPILE_ENV_VAR, "auto").strip().lower()
    if env in ("0", "false", "no"):
        return False
    if env in ("1", "true", "yes"):
        return True
    return None


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _run(fn: Callable, compiled: bool, *args: object) -> object:
    """Call ``fn`` compiled or eagerly; a failing compiler switches this process to eager with a warning."""
    global _compile_failed
    if compiled and not _compile_failed:
        try:
            # each block shape and kind is one compiled variant; allow more than dynamo's default 8
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT), warnings.catch_warnings():
                # torch's own deprecation notices while compiling are not failures (and must
                # not become exceptions under `-W error`)
                warnings.simplefilter("ignore", DeprecationWarning)
                return _compiled(fn)(*args)
        except Exception as err:  # a missing C++ compiler shows up here, with many error types
            _compile_failed = True
            warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); "
                          "boltzlab.kernels continues in eager mode", RuntimeWarning, stacklevel=3)
    return fn(*args)


# ----------------------------------------------------------------------------------------
# Public CPU entry points
# ----------------------------------------------------------------------------------------


def _pairs_per_block(compiled: bool) -> int:
    return PAIRS_PER_BLOCK if compiled else EAGER_PAIRS_PER_BLOCK


def _block_shape(batch: int, n_pairs: int, compiled: bool) -> tuple[int, int]:
    """(points per block, copies per block) for about :func:`_pairs_per_block` pairs per block;
    copies is a power of two dividing NOISE_CHUNK."""
    target = max(1, _pairs_per_block(compiled) // max(n_pairs, 1))
    copies = 1
    while copies * 2 <= NOISE_CHUNK and copies * 2 * batch <= target:
        copies *= 2
    n_point_blocks = math.ceil(batch * copies / target)
    return math.ceil(batch / n_point_blocks), copies


def lj_energy_forces_cpu(potential: PairPotential, x: Tensor, compile: bool | None = None) -> tuple[Tensor, Tensor]:
    """E (B,) and F (B, dim) for x (B, dim), in blocks of about :func:`_pairs_per_block` pairs."""
    params = PairParams.from_potential(potential)
    batch, n, d = x.shape[0], params.n_particles, params.spatial_dim
    compiled = use_compile(compile, batch * params.n_pairs)
    p = params.as_tensor(x.dtype, x.device)
    nbr = neighbour_table(n, x.device)
    block = min(batch, max(1, _pairs_per_block(compiled) // params.n_pairs))
    n_blocks = math.ceil(batch / block)
    padded = torch.zeros(n_blocks * block, n * d, dtype=x.dtype, device=x.device)
    padded[:batch] = x  # zero padding: coincident particles, finite and discarded
    energies, forces = [], []
    for b0 in range(0, n_blocks * block, block):
        xb = padded[b0:b0 + block].reshape(block, n, d).permute(2, 1, 0).contiguous()
        e, f = _run(pair_block, compiled, xb, nbr, p, params.kind)
        energies.append(e)
        forces.append(f.permute(2, 1, 0).reshape(block, n * d))
    return torch.cat(energies)[:batch], torch.cat(forces)[:batch]


def _coordinate_major_chunks(energy: Energy, inputs: ScoreInputs, generator: torch.Generator | None) -> Iterator[Tensor]:
    """Noise chunks ``(*coordinate_layout, k_c, B)``: drawn, or views of the explicit noise."""
    if inputs.noise is None:
        return iter_noise_chunks(energy, inputs.batch, inputs.n_samples, generator=generator,
                                 dtype=inputs.x_t.dtype, device=inputs.x_t.device)
    layout = coordinate_layout(energy)
    point_major = inputs.noise.reshape(inputs.batch, inputs.n_samples, *reversed(layout))
    return (c.permute(*reversed(range(c.ndim))) for c in point_major.split(NOISE_CHUNK, dim=1))


def score_estimate_cpu(
    energy: Energy,
    inputs: ScoreInputs,
    generator: torch.Generator | None,
    compile: bool | None = None,
    block_points: int | None = None,
    block_copies: int | None = None,
    noise_form: bool = False,
) -> ScoreEstimate:
    """The streamed estimator for checked ``inputs`` (see :func:`boltzlab.kernels.mc_score_estimate`).

    Pair potentials use the coordinate-major block kernel; any other energy is evaluated with
    ``energy.energy_and_forces`` chunk by chunk (:func:`_score_estimate_generic`).
    ``block_points``/``block_copies`` override the automatic block shape (``block_copies``
    must divide NOISE_CHUNK). ``noise_form`` also accumulates sum_k w_k eps_k (the
    estimate's ``noise_score``).
    """
    if not isinstance(energy, PairPotential):
        return _score_estimate_generic(energy, inputs, generator, block_points, noise_form)
    params = PairParams.from_potential(energy)
    compiled = use_compile(compile, inputs.batch * inputs.n_samples * params.n_pairs)
    auto_points, auto_copies = _block_shape(inputs.batch, params.n_pairs, compiled)
    points = block_points or auto_points
    copies = block_copies or auto_copies
    if points < 1 or copies < 1 or NOISE_CHUNK % copies:
        raise ValueError(f"need block_points >= 1 and block_copies dividing {NOISE_CHUNK}, "
                         f"got {block_points} and {block_copies}")
    batch, dtype, device = inputs.batch, inputs.x_t.dtype, inputs.x_t.device
    n, d = params.n_particles, params.spatial_dim
    n_point_blocks = math.ceil(batch / points)
    padded_batch = n_point_blocks * points
    # padded points and copies are evaluated and discarded, so every block has one shape
    x_cm = torch.zeros(d, n, padded_batch, dtype=dtype, device=device)
    x_cm[:, :, :batch] = inputs.x_t.reshape(batch, n, d).permute(2, 1, 0)
    sigma = torch.zeros(padded_batch, dtype=dtype, device=device)
    sigma[:batch] = inputs.sigma
    n_values = 2 * n * d if noise_form else n * d
    state = OnlineLSEState.empty(padded_batch, n_values, dtype, device)
    m, s1, s2, acc = state.max_log_weight, state.sum_weights, state.sum_sq_weights, state.weighted_sum
    p = params.as_tensor(dtype, device)
    nbr = neighbour_table(n, device)
    noise_buffer = torch.zeros(d, n, NOISE_CHUNK, padded_batch, dtype=dtype, device=device)
    all_copies = torch.arange(NOISE_CHUNK, device=device)
    for chunk in _coordinate_major_chunks(energy, inputs, generator):
        k_chunk = chunk.shape[-2]
        if chunk.shape == noise_buffer.shape and chunk.is_contiguous():
            noise = chunk  # the common case: a full chunk drawn in the right layout, no copy
        else:
            noise = noise_buffer  # stale entries beyond the chunk are finite and masked
            noise[:, :, :k_chunk, :batch] = chunk
        valid = (all_copies < k_chunk).expand(points, -1).contiguous()
        for b0 in range(0, padded_batch, points):
            rows = slice(b0, b0 + points)
            for c0 in range(0, k_chunk, copies):
                xb, eb = _run(prepare_block, compiled, x_cm[:, :, rows], sigma[rows],
                              noise[:, :, c0:c0 + copies, rows], True)
                m[rows], s1[rows], s2[rows], acc[rows] = _run(
                    pairs_and_fold, compiled, xb, eb if noise_form else None, valid[:, c0:c0 + copies], nbr, p,
                    params.kind, m[rows], s1[rows], s2[rows], acc[rows])
    # coordinate-major (a * N + i) back to particle-major (i * d + a), for each value block
    acc = acc.reshape(padded_batch, -1, d, n).transpose(2, 3).reshape(padded_batch, n_values)
    final = OnlineLSEState(m[:batch], s1[:batch], s2[:batch], acc[:batch])
    return finish_estimate(final, energy.kT, inputs.n_samples, inputs.sigma if noise_form else None)


def _score_estimate_generic(
    energy: Energy, inputs: ScoreInputs, generator: torch.Generator | None, block_points: int | None,
    noise_form: bool = False,
) -> ScoreEstimate:
    """Streamed estimator for any energy, with its own ``energy_and_forces``: one noise chunk
    (at most 64 copies) for ``block_points`` points at a time."""
    batch = inputs.batch
    points = block_points or max(1, GENERIC_COPIES_PER_BLOCK // min(NOISE_CHUNK, inputs.n_samples))
    n_values = 2 * energy.dim if noise_form else energy.dim
    state = OnlineLSEState.empty(batch, n_values, inputs.x_t.dtype, inputs.x_t.device)
    for chunk in _coordinate_major_chunks(energy, inputs, generator):
        eps = project_noise(point_major(chunk), energy)  # (B, k_c, dim)
        for b0 in range(0, batch, points):
            rows = slice(b0, b0 + points)
            copies = inputs.x_t[rows, None] + inputs.sigma[rows, None, None] * eps[rows]
            e, f = energy.energy_and_forces(copies)
            if noise_form:
                f = torch.cat([f, eps[rows]], dim=-1)
            part = OnlineLSEState(state.max_log_weight[rows], state.sum_weights[rows],
                                  state.sum_sq_weights[rows], state.weighted_sum[rows])
            new = fold_block(part, -e / energy.kT, f)
            state.max_log_weight[rows] = new.max_log_weight
            state.sum_weights[rows] = new.sum_weights
            state.sum_sq_weights[rows] = new.sum_sq_weights
            state.weighted_sum[rows] = new.weighted_sum
    return finish_estimate(state, energy.kT, inputs.n_samples, inputs.sigma if noise_form else None)
