"""Baselines that need no roll-outs: reward-weighted regression (its weights; the weighted
denoising score matching is :func:`boltzlab.diffusion.fit_score_model`) and best-of-N."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from boltzlab.finetune._checks import (
    FinetuneInputError,
    _positive_float,
    _positive_int,
    _tensor,
)


def reward_weights(rewards: Tensor, alpha: float = 1.0) -> Tensor:
    r"""Self-normalised weights w_i = exp(r_i/alpha) / sum_j exp(r_j/alpha) of samples x_i ~ q0: ``(n,) -> (n,)``.

    sum_i w_i f(x_i) estimates E_{q0 e^{r/alpha}}[f]: reward-weighted regression fits the model
    to this reweighted sample.
    """
    r = _tensor(rewards, 1, "rewards", "(n,)")
    return torch.softmax(r / _positive_float(alpha, "alpha"), dim=0)


# ----------------------------------------------------------------------------------------
# best-of-N
# ----------------------------------------------------------------------------------------


def best_of_n(candidates: Tensor, rewards: Tensor) -> Tensor:
    r"""Keep the highest-reward candidate of each group: ``(B, N, dim), (B, N) -> (B, dim)``.

    If the candidates are i.i.d. from q0, the result has density N q0(x) F(r(x))^{N-1}, with
    F the CDF of r(x), x ~ q0 (for a continuous reward).
    """
    candidates = _tensor(candidates, 3, "candidates", "(B, N, dim)")
    rewards = _tensor(rewards, 2, "rewards", "(B, N)")
    if tuple(rewards.shape) != tuple(candidates.shape[:2]):
        raise FinetuneInputError(f"rewards has shape {tuple(rewards.shape)}, expected {tuple(candidates.shape[:2])}")
    best = rewards.argmax(dim=1)
    return candidates[torch.arange(candidates.shape[0]), best]


def best_of_n_grid_probs(probs: Tensor, rewards: Tensor, n: int) -> Tensor:
    r"""The exact best-of-N distribution over the cells of a grid.

    ``probs`` (G,): the mass q0 puts on each cell (summing to 1); ``rewards`` (G,): r at each
    cell. Sorting cells by reward with cumulative mass F_i (F_0 = 0), the best of N draws
    falls in cell i with probability F_i^N - F_{i-1}^N (the discrete version of
    N q0 F^{N-1}). Cells with equal rewards share their block's mass in proportion to probs.
    Returns (G,), summing to 1.
    """
    probs = _tensor(probs, 1, "probs", "(G,)").to(torch.float64)
    rewards = _tensor(rewards, 1, "rewards", "(G,)")
    n = _positive_int(n, "n")
    if probs.shape != rewards.shape:
        raise FinetuneInputError(f"probs {tuple(probs.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    if bool((probs < 0).any()) or abs(float(probs.sum()) - 1.0) > 1e-6:
        raise FinetuneInputError(f"probs must be non-negative and sum to 1, got sum {float(probs.sum()):.6g}")
    order = torch.argsort(rewards.to(torch.float64), stable=True)
    sorted_r = rewards[order]
    cum = torch.cumsum(probs[order], 0).clamp(max=1.0)
    # ties: every cell of a block of equal rewards uses the block's lower and upper F
    _, inverse, counts = torch.unique_consecutive(sorted_r, return_inverse=True, return_counts=True)
    upper = cum[torch.cumsum(counts, 0) - 1][inverse]
    block_mass = torch.zeros(counts.shape[0], dtype=torch.float64).index_add_(0, inverse, probs[order])
    lower = (upper - block_mass[inverse]).clamp(min=0.0)
    share = torch.where(block_mass[inverse] > 0, probs[order] / block_mass[inverse], torch.zeros_like(cum))
    out_sorted = (upper.pow(n) - lower.pow(n)) * share
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def best_of_n_kl(n: int) -> float:
    r"""KL(best-of-N || q0) = log N - (N - 1)/N for a continuous reward (any q0, any r)."""
    n = _positive_int(n, "n")
    return math.log(n) - (n - 1) / n
