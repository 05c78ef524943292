"""Distances between distributions on a quadrature grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from boltzlab.finetune._checks import FinetuneInputError


def grid_kl(log_p: Tensor, log_q: Tensor) -> float:
    r"""KL(p || q) = sum_i p_i (log p_i - log q_i) between two distributions over the same grid cells.

    ``log_p``, ``log_q`` (G,): log densities at the cell centres of an equal-area grid (any
    additive constant; each is normalised over the cells by a log-softmax, so the result is
    the KL between the two distributions restricted to the grid). Works in log space, so
    densities of 1e-300 are fine; -inf marks an empty cell (p_i = 0 contributes 0; q_i = 0
    where p_i > 0 gives inf).
    """
    for name, v in (("log_p", log_p), ("log_q", log_q)):
        if not isinstance(v, Tensor) or v.ndim != 1 or not v.is_floating_point():
            raise FinetuneInputError(f"{name} must be a floating tensor of shape (G,), got {getattr(v, 'shape', v)!r}")
        if bool(torch.isnan(v).any()) or bool((v == math.inf).any()):
            raise FinetuneInputError(f"{name} contains NaN or +inf")
    if log_p.shape != log_q.shape:
        raise FinetuneInputError(f"log_p {tuple(log_p.shape)} and log_q {tuple(log_q.shape)} differ in shape")
    lp = torch.log_softmax(log_p.to(torch.float64), 0)
    lq = torch.log_softmax(log_q.to(torch.float64), 0)
    mask = lp > -math.inf
    if bool((lq[mask] == -math.inf).any()):
        return math.inf
    return float((lp[mask].exp() * (lp[mask] - lq[mask])).sum())
