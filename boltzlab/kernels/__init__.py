r"""Fast pair-potential energies and forces, and the fused DEM Monte Carlo score estimator.

Two public functions; the device of the input picks the implementation, so chapters and
training code never see the difference:

- :func:`lj_energy_forces` (E, F = -grad E) of a :class:`~boltzlab.energies.PairPotential`
  (LJ benchmark, standard LJ, DW-4) for a batch of configurations;
- :func:`mc_score_estimate`, the DEM score target
  S_K(x_t) = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT,  x_k = x_t + sigma eps_k,
  streamed over K with an online logsumexp (memory O(B * dim), not O(B * K * dim)), and in
  the same pass, on request, its noise (Tweedie) form sum_k softmax_k eps_k / sigma.

============  ==============================================================================
backend       what runs
============  ==============================================================================
``"auto"``    CUDA tensors of a pair potential with N <= 128: Triton kernels; otherwise "torch"
``"triton"``  the Triton kernels (:mod:`.triton_kernels`); CPU tensors need TRITON_INTERPRET=1
``"torch"``   chunked analytic-force PyTorch (:mod:`.cpu`), torch.compile when it pays off
``"reference"`` the plain, materialising references (:mod:`.reference`)
============  ==============================================================================

The Triton module is imported only when a kernel is first needed (Triton reads
``TRITON_INTERPRET`` at that moment); :mod:`.interpret` runs the kernels on the CPU in a
child process for tests and the appendix chapter.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from types import ModuleType

import torch
from torch import Tensor

from boltzlab.energies import Energy, PairPotential
from boltzlab.kernels.cpu import lj_energy_forces_cpu, score_estimate_cpu
from boltzlab.kernels.estimate import ScoreEstimate, ScoreInputError, check_score_inputs
from boltzlab.kernels.noise import NOISE_CHUNK, draw_noise
from boltzlab.kernels.reference import dense_pair_energy_forces, reference_score_estimate

__all__ = [
    "BACKENDS", "NOISE_CHUNK", "ScoreEstimate", "ScoreInputError", "draw_noise",
    "lj_energy_forces", "mc_score_estimate", "triton_available",
]

BACKENDS: tuple[str, ...] = ("auto", "triton", "torch", "reference")

_TRITON_MAX_PARTICLES = 128  # mirrors triton_kernels.MAX_PARTICLES without importing Triton


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _triton() -> ModuleType:
    return importlib.import_module("boltzlab.kernels.triton_kernels")


def _choose_backend(backend: str, energy: Energy, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "triton" and not isinstance(energy, PairPotential):
        raise ValueError(f"the Triton kernels cover pair potentials only, not {type(energy).__name__}")
    if backend != "auto":
        return backend
    fits_kernel = isinstance(energy, PairPotential) and energy.n <= _TRITON_MAX_PARTICLES
    if device.type == "cuda" and fits_kernel:
        if triton_available():
            return "triton"
        warnings.warn("CUDA tensors but no triton package: using the PyTorch path", RuntimeWarning, stacklevel=3)
    return "torch"


def lj_energy_forces(
    potential: PairPotential,
    x: Tensor,
    *,
    backend: str = "auto",
    compile: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Energies and forces of a pair potential: ``(..., dim) -> ((...), (..., dim))``.

    E = c sum_{i<j} u(d_ij) + 0.5 k sum_i |x_i - mean|^2 and F = -grad E, with the conventions
    of :class:`~boltzlab.energies.PairPotential` (LJ benchmark, standard LJ, DW-4).
    ``compile`` applies to the "torch" backend (see :func:`boltzlab.kernels.cpu.use_compile`).
    """
    if not isinstance(potential, PairPotential):
        raise TypeError(f"lj_energy_forces needs a boltzlab.energies.PairPotential, got {type(potential).__name__}")
    x = potential.check_input(x)
    lead = x.shape[:-1]
    flat = x.reshape(-1, potential.dim)
    chosen = _choose_backend(backend, potential, x.device)
    if chosen == "reference":
        e, f = dense_pair_energy_forces(potential, flat)
    elif chosen == "triton":
        e, f = _triton().pair_energy_forces_triton(potential, flat)
    else:
        e, f = lj_energy_forces_cpu(potential, flat, compile=compile)
    return e.reshape(lead), f.reshape(x.shape)


def mc_score_estimate(
    energy: Energy,
    x_t: Tensor,
    sigma: float | Tensor,
    n_samples: int | None = None,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    compile: bool | None = None,
    block_points: int | None = None,
    block_copies: int | None = None,
    noise_form: bool = False,
) -> ScoreEstimate:
    """The DEM Monte Carlo score target at noisy points ``x_t`` (B, dim).

    S_K(x_t) = sum_k softmax_k(-E(x_k)/kT) F(x_k)/kT with x_k = x_t + sigma eps_k, eps_k ~ N(0, I)
    (projected to the centre-of-mass-free subspace for particle systems): an estimate of
    grad log p_t(x_t), p_t = p * N(0, sigma^2 I).

    Args:
        energy: the target; pair potentials take the fast kernels, any other
            :class:`~boltzlab.energies.Energy` the streamed PyTorch path with its own forces.
        x_t: (B, dim) noisy points.
        sigma: noise level, a float or a tensor of shape () or (B,), >= 0.
        n_samples: K, the copies per point (taken from ``noise`` when that is given).
        noise: explicit eps (B, K, dim), so different backends see the same perturbations.
        generator: draws eps in chunks of :data:`NOISE_CHUNK` copies (see :mod:`.noise`);
            None uses the global RNG. Not together with ``noise``.
        backend: see the module docstring. ``compile``: torch.compile for the "torch" backend
            (None: automatic). ``block_points``/``block_copies``: override the tile shape.
        noise_form: also accumulate the noise (Tweedie) form sum_k w_k eps_k / sigma in the
            same pass (``noise_score``; :func:`boltzlab.estimators.blended_score` needs it).
            The reference backend always computes it.

    Returns a :class:`ScoreEstimate`: ``score`` (B, dim), ``log_normalizer`` (B,),
    ``ess`` (B,), ``n_energy_evals`` = B * K and ``noise_score`` (B, dim) or None.
    Raises :class:`ScoreInputError` for bad input.
    """
    inputs = check_score_inputs(energy, x_t, sigma, n_samples, noise, generator)
    chosen = _choose_backend(backend, energy, inputs.x_t.device)
    if chosen == "reference":
        eps = inputs.noise if inputs.noise is not None else draw_noise(
            energy, inputs.batch, inputs.n_samples, generator=generator,
            dtype=inputs.x_t.dtype, device=inputs.x_t.device)
        return reference_score_estimate(energy, inputs.x_t, inputs.sigma, eps)
    if chosen == "triton":
        assert isinstance(energy, PairPotential)
        return _triton().score_estimate_triton(energy, inputs, generator, block_points, block_copies,
                                               noise_form=noise_form)
    return score_estimate_cpu(energy, inputs, generator, compile=compile,
                              block_points=block_points, block_copies=block_copies, noise_form=noise_form)
