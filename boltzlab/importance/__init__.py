r"""Importance sampling: reweight a sampler's output to the Boltzmann distribution.

A sampler q (a flow, a diffusion sampler) proposes x_i ~ q; the target is
p(x) = exp(-E(x)/kT) / Z. With the log-weights

    log w_i = -E(x_i)/kT - log q(x_i),

Z = E_q[w], and any average under p is a self-normalised weighted average,
E_p[A] ≈ Σ_i w̄_i A(x_i) with w̄ = softmax(log w). Everything here works on log-weights
(never on w itself, which overflows), in float64.

=====================================  ======================================================
weights (from :mod:`boltzlab.metrics`)  :func:`self_normalized_weights`, :func:`kish_ess`,
                                        :func:`normalized_ess`, :func:`log_z_estimate`,
                                        :func:`log_z_error` (re-exported)
weights of a sampler                    :func:`sampler_log_weights`
log Z with a bootstrap interval         :func:`log_z_bootstrap` -> :class:`LogZBootstrap`
estimators on small subsamples          :func:`subsample_estimates`
resampling to (approximately) p         :func:`importance_resample`
free energies (units of kT)             :func:`fep_free_energy` (Zwanzig, forward/reverse),
                                        :func:`bar_free_energy` (Bennett acceptance ratio),
                                        :func:`state_free_energy_difference` (two regions of
                                        one reweighted sample) -> :class:`FreeEnergyEstimate`
log Z of a sampler's target, 3 ways     :func:`log_z_three_ways` (forward FEP = importance
                                        sampling, reverse FEP from samples of p, BAR)
likelihood of a diffusion sampler       :func:`pf_ode_log_prob` (probability-flow ODE, exact
                                        or Hutchinson divergence, centre-of-mass subspace)
=====================================  ======================================================

Conventions: free energies are in units of kT, ΔF = F_1 - F_0 = -log(Z_1 / Z_0), and the
reduced potentials are u_k(x) = E_k(x)/kT_k (or -log q(x) for a normalised sampler, whose
Z is 1). Bad input raises :class:`ImportanceInputError` (a ``ValueError``) naming the
problem: shapes, lengths, NaN or infinite energies, an unknown option.

Modules: :mod:`~boltzlab.importance.weights` (weights, bootstrap, subsamples, resampling),
:mod:`~boltzlab.importance.free_energy` (FEP, BAR, log Z three ways, states) and
:mod:`~boltzlab.importance.likelihood` (the probability-flow ODE's log q).
"""

from boltzlab.importance.free_energy import (
    FreeEnergyEstimate,
    bar_free_energy,
    fep_free_energy,
    log_z_three_ways,
    state_free_energy_difference,
)
from boltzlab.importance.likelihood import pf_ode_log_prob
from boltzlab.importance.weights import (
    ImportanceInputError,
    LogZBootstrap,
    SubsampleEstimates,
    importance_resample,
    log_z_bootstrap,
    sampler_log_weights,
    subsample_estimates,
)
from boltzlab.metrics import (
    kish_ess,
    log_z_error,
    log_z_estimate,
    normalized_ess,
    self_normalized_weights,
)

__all__ = [
    "FreeEnergyEstimate",
    "ImportanceInputError",
    "LogZBootstrap",
    "SubsampleEstimates",
    "bar_free_energy",
    "fep_free_energy",
    "importance_resample",
    "kish_ess",
    "log_z_bootstrap",
    "log_z_error",
    "log_z_estimate",
    "log_z_three_ways",
    "normalized_ess",
    "pf_ode_log_prob",
    "sampler_log_weights",
    "self_normalized_weights",
    "state_free_energy_difference",
    "subsample_estimates",
]
