"""Baselines that need no roll-outs: reward-weighted regression (with plain denoising score
matching, which also pretrains) and best-of-N."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from boltzlab.diffusion import GeometricNoiseSchedule, Projection, denoising_score_matching_loss
from boltzlab.finetune._checks import FinetuneInputError, _positive_float, _positive_int, _tensor
from boltzlab.training import TrainingHistory, run_training


def reward_weights(rewards: Tensor, alpha: float = 1.0) -> Tensor:
    r"""Self-normalised weights w_i = exp(r_i/alpha) / sum_j exp(r_j/alpha) of samples x_i ~ q0: ``(n,) -> (n,)``.

    sum_i w_i f(x_i) estimates E_{q0 e^{r/alpha}}[f]: reward-weighted regression fits the model
    to this reweighted sample.
    """
    r = _tensor(rewards, 1, "rewards", "(n,)")
    return torch.softmax(r / _positive_float(alpha, "alpha"), dim=0)


def fit_score_model(
    model: nn.Module,
    data: Tensor,
    schedule: GeometricNoiseSchedule,
    n_steps: int,
    *,
    weights: Tensor | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    t_min: float = 1e-3,
    project: Projection | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "denoising score matching",
) -> TrainingHistory:
    r"""Train ``model`` in place by denoising score matching on ``data`` (n, dim).

    Minibatches are drawn uniformly (pretraining) or, with ``weights`` (n,), with probability
    proportional to them, so the loss is sum_i w_i L_DSM(x_i) / sum_i w_i: with
    w = :func:`reward_weights` this is reward-weighted regression, whose minimiser is the
    score of the reweighted (tilted) sample. Adam with learning rate ``lr``, cosine-decayed to
    zero. Returns the history (``loss`` per step).
    """
    data = _tensor(data, 2, "data", "(n, dim)")
    n_steps, batch_size = _positive_int(n_steps, "n_steps"), _positive_int(batch_size, "batch_size")
    if weights is not None:
        weights = _tensor(weights, 1, "weights", "(n,)")
        if weights.shape[0] != data.shape[0]:
            raise FinetuneInputError(f"weights has {weights.shape[0]} entries for {data.shape[0]} samples")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise FinetuneInputError("weights must be non-negative with a positive sum")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=_positive_float(lr, "lr"))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_steps)
    model.train()

    def step(_: int) -> dict[str, float]:
        if weights is None:
            idx = torch.randint(data.shape[0], (batch_size,), generator=generator)
        else:
            idx = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        loss = denoising_score_matching_loss(model, data[idx], schedule, project=project, generator=generator,
                                             t_min=t_min)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        return {"loss": loss.item()}

    history = run_training(step, n_steps, progress=progress, desc=desc)
    model.eval()
    return history


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
