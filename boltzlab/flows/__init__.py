r"""Normalizing flows for chapter 02 (and 03, 06): every public name is importable from here.

- :mod:`boltzlab.flows.coupling`     coupling layers (RealNVP, rational-quadratic splines),
  :class:`Flow`, the builders :func:`realnvp` and :func:`spline_flow`
- :mod:`boltzlab.flows.training`     maximum likelihood, reverse KL, their mix, temperature
  annealing; grid tools for 2-D flows
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
    "AffineCoupling",
    "AnnealingStage",
    "Bijection",
    "ElementwiseAffine",
    "Flow",
    "FlowInputError",
    "SplineCoupling",
    "alternating_masks",
    "annealing_schedule",
    "coupling_stages",
    "kl_on_grid",
    "ladder_table",
    "log_prob_on_grid",
    "rational_quadratic_spline",
    "realnvp",
    "spline_flow",
    "standard_normal_log_prob",
    "train",
    "train_annealed",
]
