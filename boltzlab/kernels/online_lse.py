r"""Online (streaming) logsumexp-weighted averages: the heart of the fused score estimator.

We want, for each of B rows, the self-normalised average of K vectors v_k with log-weights l_k,

    S = sum_k softmax(l)_k v_k = (sum_k e^{l_k} v_k) / (sum_k e^{l_k}),

without holding all K at once. Stream over blocks of k and keep, per row,

    m   = max of the l_k seen so far            (the shift that keeps exp() in range)
    s1  = sum_k e^{l_k - m}                     (the normaliser, relative to m)
    s2  = sum_k e^{2 (l_k - m)}                 (for the effective sample size)
    acc = sum_k e^{l_k - m} v_k                 (the weighted sum, relative to m)

A new block with maximum m_b gives m' = max(m, m_b); everything accumulated so far is
rescaled by e^{m - m'} (e^{2(m - m')} for s2) and the block adds its own terms relative to m'.
At the end S = acc / s1, log((1/K) sum_k e^{l_k}) = m + log(s1) - log(K) and the Kish
effective sample size is s1^2 / s2. Every exponent is <= 0, so nothing overflows, however
large |l_k| is (e.g. l_k = -1e24 for overlapping particles).

Entries with l_k = -inf (padding) get weight zero. A row that has seen only -inf so far keeps
m = -inf; the shift then uses 0 instead so no inf - inf appears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OnlineLSEState:
    """Running state of :func:`online_lse_update` for B rows and D-dimensional values.

    ``max_log_weight`` (B,), ``sum_weights`` (B,), ``sum_sq_weights`` (B,), ``weighted_sum`` (B, D);
    the weights are relative to ``max_log_weight``.
    """

    max_log_weight: Tensor
    sum_weights: Tensor
    sum_sq_weights: Tensor
    weighted_sum: Tensor

    @classmethod
    def empty(cls, batch: int, value_dim: int, dtype: torch.dtype, device: torch.device | str) -> "OnlineLSEState":
        """The state before any block: m = -inf, all sums zero."""
        return cls(
            max_log_weight=torch.full((batch,), -math.inf, dtype=dtype, device=device),
            sum_weights=torch.zeros(batch, dtype=dtype, device=device),
            sum_sq_weights=torch.zeros(batch, dtype=dtype, device=device),
            weighted_sum=torch.zeros(batch, value_dim, dtype=dtype, device=device),
        )


def online_lse_update(
    max_log_weight: Tensor,
    sum_weights: Tensor,
    sum_sq_weights: Tensor,
    weighted_sum: Tensor,
    log_weights: Tensor,
    values: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fold one block into the running state (see the module docstring for the equations).

    Args: the state (B,), (B,), (B,), (B, D); ``log_weights`` (B, k_b) with -inf for padding;
    ``values`` (B, k_b, D). Returns the new state as a tuple in the same order.
    """
    new_max = torch.maximum(max_log_weight, log_weights.amax(dim=1))
    # rows that have seen only padding keep m = -inf; shift by 0 there to avoid inf - inf
    shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
    rescale = torch.exp(max_log_weight - shift)
    w = torch.exp(log_weights - shift[:, None])
    sum_weights = sum_weights * rescale + w.sum(dim=1)
    sum_sq_weights = sum_sq_weights * rescale * rescale + (w * w).sum(dim=1)
    weighted_sum = weighted_sum * rescale[:, None] + (w[:, :, None] * values).sum(dim=1)
    return new_max, sum_weights, sum_sq_weights, weighted_sum


def fold_block(state: OnlineLSEState, log_weights: Tensor, values: Tensor) -> OnlineLSEState:
    """:func:`online_lse_update` on an :class:`OnlineLSEState`."""
    return OnlineLSEState(*online_lse_update(
        state.max_log_weight, state.sum_weights, state.sum_sq_weights, state.weighted_sum,
        log_weights, values,
    ))
