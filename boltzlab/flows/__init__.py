r"""Normalizing flows for chapter 02 (and 03, 06): every public name is importable from here.

- :mod:`boltzlab.flows.coupling`     coupling layers (RealNVP, rational-quadratic splines),
  :class:`Flow`, the builders :func:`realnvp` and :func:`spline_flow`
- :mod:`boltzlab.flows.training`     maximum likelihood, reverse KL, their mix, temperature
  annealing; grid tools for 2-D flows
- :mod:`boltzlab.flows.equivariant`  a Boltzmann generator for particle systems: equivariant
  flow matching (a CNF with an EGNN vector field on centre-of-mass-free coordinates),
  exact ODE likelihood, importance weights
- :mod:`boltzlab.flows.particle_training`  its per-target configs, resumable training and
  evaluation (``python -m boltzlab train-flow TARGET``)
"""

from boltzlab.flows.coupling import (
    AffineCoupling,
    Bijection,
    ElementwiseAffine,
    Flow,
    FlowInputError,
    SplineCoupling,
    alternating_masks,
    coupling_stages,
    rational_quadratic_spline,
    realnvp,
    spline_flow,
    standard_normal_log_prob,
)
from boltzlab.flows.equivariant import (
    ALIGNMENTS,
    EquivariantCNF,
    align_pairs,
    com_free_basis,
    com_free_gaussian_log_prob,
    flow_matching_loss,
    importance_log_weights,
    integrate,
    ode_convergence,
    sample_com_free_gaussian,
)
from boltzlab.flows.training import (
    AnnealingStage,
    annealing_schedule,
    kl_on_grid,
    ladder_table,
    log_prob_on_grid,
    train,
    train_annealed,
)

__all__ = [
    "ALIGNMENTS",
    "AffineCoupling",
    "AnnealingStage",
    "Bijection",
    "ElementwiseAffine",
    "EquivariantCNF",
    "Flow",
    "FlowInputError",
    "SplineCoupling",
    "align_pairs",
    "alternating_masks",
    "annealing_schedule",
    "com_free_basis",
    "com_free_gaussian_log_prob",
    "coupling_stages",
    "flow_matching_loss",
    "importance_log_weights",
    "integrate",
    "kl_on_grid",
    "ladder_table",
    "log_prob_on_grid",
    "ode_convergence",
    "rational_quadratic_spline",
    "realnvp",
    "sample_com_free_gaussian",
    "spline_flow",
    "standard_normal_log_prob",
    "train",
    "train_annealed",
]
