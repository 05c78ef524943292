r"""Variance-exploding diffusion: noise schedule, reverse SDE, probability-flow ODE, denoising score
matching, replay buffer.

The forward (noising) process adds Gaussian noise with no drift,

    dx = g(t) dW,   t in [0, 1],   so   x_t = x_0 + sigma_t * eps,   eps ~ N(0, I),

and ``p_t = p_0 * N(0, sigma_t^2 I)``. The geometric schedule of DEM/iDEM sets

    g(t)^2 = 2 log(r) sigma_min^2 r^(2t),   r = sigma_max / sigma_min,
    sigma_t^2 = int_0^t g(s)^2 ds = sigma_min^2 (r^(2t) - 1),

so that ``sigma_0 = 0`` exactly (``p_0`` is the target) and ``sigma_1 ≈ sigma_max``.
Sampling runs time backwards with a learned score ``s(x, t) ≈ ∇ log p_t(x)``:

    reverse SDE, one step from t to t - dt:
                                   x <- x + Delta s(x, t) + sqrt(Delta) z,
        Delta = g(t)^2 dt                                   ("euler": Euler-Maruyama, the default)
        Delta = sigma_t^2 - sigma_{t-dt}^2 = int_{t-dt}^t g(s)^2 ds               ("exact")
    probability-flow ODE:          dx/dt = -1/2 g(t)^2 s(x, t)

Both increments agree as dt -> 0 (first-order bias). The exact one adds, over the whole run,
exactly the variance sigma_1^2 that the forward process added, at any number of steps, where
Euler's g(t)^2 dt (taken at the step's upper end, where g^2 is largest for this schedule)
adds more: by a factor r^(2 dt) (2 log r) dt / (r^(2 dt) - 1) per step, about 1.06 for
LJ-13's r = 200 at 100 steps and 1.7 at 10 steps. That does not make it the more accurate
sampler: the larger Euler increment also scales the drift, and for Gaussian data with the
exact score the two errors partly cancel (tests/test_diffusion.py); which one needs fewer
steps for a trained model is measured (benchmarks/README.md).

both started from ``x_1 ~ N(0, sigma_1^2 I)``. For particle systems every noise draw and
every state is projected onto the centre-of-mass-free subspace (pass ``project``).

A score function has the signature ``score(x, t) -> s`` with ``x`` of shape ``(B, dim)``,
``t`` of shape ``(B,)`` and ``s`` of shape ``(B, dim)``; the networks in
:mod:`boltzlab.models` follow it.

Every public name is importable from ``boltzlab.diffusion`` itself; the modules:

- :mod:`boltzlab.diffusion.schedule`  the forward process: :class:`GeometricNoiseSchedule`,
  :func:`sample_prior`, :func:`perturb`, :func:`sample_times`
- :mod:`boltzlab.diffusion.sampling`  the reverse SDE (:func:`sde_variance_increments`,
  :func:`reverse_sde_sample`, :func:`reverse_sde_step`), the diagnostics that localise a
  score's error in noise level (:func:`reverse_sde_from_data`, :func:`score_with_mc_below`) and the probability-flow ODE
  (:func:`pf_ode_drift`, :func:`probability_flow_sample`)
- :mod:`boltzlab.diffusion.dsm`       denoising score matching: :func:`denoising_score_matching_loss`,
  :func:`dsm_loss`, :func:`tweedie_denoise` and the training loop :func:`fit_score_model`
  (optionally weighted: diffusion from data in chapter 04, pretraining and reward-weighted
  regression in chapter 08)
- :mod:`boltzlab.diffusion.scaling`   well-conditioned networks: :class:`ScaledScore`,
  :class:`ScaledEnergy`
- :mod:`boltzlab.diffusion.buffer`    iDEM's :class:`ReplayBuffer`

Bad input raises :class:`DiffusionInputError` (a ``ValueError``) naming the problem.
"""

from boltzlab.diffusion._checks import DiffusionInputError, Projection, ScoreFn
from boltzlab.diffusion._checks import (
    _identity as _identity,  # used by boltzlab.finetune
)
from boltzlab.diffusion.buffer import ReplayBuffer
from boltzlab.diffusion.dsm import (
    denoising_score_matching_loss,
    dsm_loss,
    fit_score_model,
    tweedie_denoise,
)
from boltzlab.diffusion.sampling import (
    SDE_INCREMENTS,
    pf_ode_drift,
    probability_flow_sample,
    reverse_sde_from_data,
    reverse_sde_sample,
    reverse_sde_step,
    score_with_mc_below,
    sde_variance_increments,
)
from boltzlab.diffusion.scaling import ScaledEnergy, ScaledScore
from boltzlab.diffusion.schedule import (
    GeometricNoiseSchedule,
    perturb,
    sample_prior,
    sample_times,
)

__all__ = [
    "SDE_INCREMENTS",
    "DiffusionInputError",
    "GeometricNoiseSchedule",
    "Projection",
    "ReplayBuffer",
    "ScaledEnergy",
    "ScaledScore",
    "ScoreFn",
    "denoising_score_matching_loss",
    "dsm_loss",
    "fit_score_model",
    "perturb",
    "pf_ode_drift",
    "probability_flow_sample",
    "reverse_sde_from_data",
    "reverse_sde_sample",
    "reverse_sde_step",
    "sample_prior",
    "score_with_mc_below",
    "sample_times",
    "sde_variance_increments",
    "tweedie_denoise",
]
