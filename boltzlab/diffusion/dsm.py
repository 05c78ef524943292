"""Denoising score matching: learning the score from samples. The loss (on random or on given
times and noise), Tweedie's formula that turns a score into a denoiser, and the training loop
:func:`fit_score_model` (optionally weighted: reward-weighted regression in chapter 08)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from boltzlab.diffusion._checks import (
    DiffusionInputError,
    Projection,
    ScoreFn,
    _check_state,
    _identity,
    _positive_float,
    _positive_int,
)
from boltzlab.diffusion.schedule import GeometricNoiseSchedule, sample_times
from boltzlab.training import TrainingHistory, run_training


def denoising_score_matching_loss(
    score: ScoreFn,
    x0: Tensor,
    schedule: GeometricNoiseSchedule,
    *,
    project: Projection | None = None,
    generator: torch.Generator | None = None,
    t_min: float = 1e-3,
) -> Tensor:
    """Denoising score matching from data, weighted by lambda(t) = sigma_t^2:

        L = E_{t, x_0, eps} || sigma_t s(x_0 + sigma_t eps, t) + eps ||^2,

    whose minimiser is s = ∇ log p_t (Vincent 2011). ``x0`` (B, dim) -> scalar.
    """
    x0 = _check_state(x0, name="x0")
    t = sample_times(x0.shape[0], generator=generator, t_min=t_min, dtype=x0.dtype, device=x0.device)
    # the same draws as perturb(), so the loss is the one it always was for a given generator
    eps = (project or _identity)(torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device))
    return dsm_loss(score, x0, t, eps, schedule)


def dsm_loss(score: ScoreFn, x0: Tensor, t: Tensor, eps: Tensor, schedule: GeometricNoiseSchedule) -> Tensor:
    r"""The denoising-score-matching loss on given times and noise (the deterministic core of
    :func:`denoising_score_matching_loss`):

        x_t = x_0 + sigma_t eps,    L = (1/B) sum_b || sigma_{t_b} s(x_t, t)_b + eps_b ||^2.

    It is the sigma_t^2-weighted regression of s(x_t, t) onto -eps / sigma_t = ∇_{x_t} log
    N(x_t; x_0, sigma_t^2 I). Over x_0 ~ p, eps and t it differs from the explicit score-matching
    loss E sigma_t^2 || s(x_t, t) - ∇ log p_t(x_t) ||^2 by a constant (Vincent 2011), so both have
    the minimiser s = ∇ log p_t; the constant is the loss of the exact score, which is not zero.

    Shapes: ``x0`` (B, dim), ``t`` (B,), ``eps`` (B, dim) -> scalar.
    """
    x0 = _check_state(x0, name="x0")
    if not isinstance(t, Tensor) or t.shape != (x0.shape[0],):
        raise DiffusionInputError(f"t must have shape ({x0.shape[0]},), one time per sample; got "
                                  f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not isinstance(eps, Tensor) or eps.shape != x0.shape:
        raise DiffusionInputError(f"eps must have the shape of x0, {tuple(x0.shape)}; got "
                                  f"{tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__}")
    sigma = schedule.std(t)[:, None]
    x_t = x0 + sigma * eps
    residual = sigma * score(x_t, t) + eps
    return residual.pow(2).sum(-1).mean()


def tweedie_denoise(x_t: Tensor, score_value: Tensor, sigma: float | Tensor) -> Tensor:
    r"""Tweedie's formula: the posterior mean of the clean sample given the noisy one,

        E[x_0 | x_t] = x_t + sigma_t^2 ∇ log p_t(x_t),

    exact for x_t = x_0 + sigma_t eps with any p_0 (differentiate p_t = ∫ p_0(x_0)
    N(x_t; x_0, sigma_t^2 I) dx_0 under the integral). ``score_value`` is ∇ log p_t at ``x_t``
    (exact or learned). Shapes: ``x_t`` and ``score_value`` (B, dim), ``sigma`` a float or (B,)
    -> (B, dim).
    """
    x_t = _check_state(x_t, name="x_t")
    if not isinstance(score_value, Tensor) or score_value.shape != x_t.shape:
        raise DiffusionInputError(f"score_value must have the shape of x_t, {tuple(x_t.shape)}; got "
                                  f"{tuple(score_value.shape) if isinstance(score_value, Tensor) else type(score_value).__name__}")
    sig = torch.as_tensor(sigma, dtype=x_t.dtype, device=x_t.device)
    if sig.ndim == 0:
        sig = sig.expand(x_t.shape[0])
    if sig.shape != (x_t.shape[0],) or bool((sig < 0).any()) or not bool(torch.isfinite(sig).all()):
        raise DiffusionInputError(f"sigma must be a finite non-negative float or shape ({x_t.shape[0]},) tensor")
    return x_t + sig[:, None] ** 2 * score_value


def _check_weights(weights: object, n: int) -> Tensor:
    """Sampling weights of ``n`` samples: a finite, non-negative (n,) tensor with a positive sum."""
    if not isinstance(weights, Tensor) or weights.ndim != 1 or not weights.is_floating_point():
        raise DiffusionInputError(f"weights must be a floating tensor of shape (n,), got {getattr(weights, 'shape', weights)!r}")
    if not bool(torch.isfinite(weights).all()):
        raise DiffusionInputError("weights contains NaN or infinite values")
    if weights.shape[0] != n:
        raise DiffusionInputError(f"weights has {weights.shape[0]} entries for {n} samples")
    if bool((weights < 0).any()) or not float(weights.sum()) > 0:
        raise DiffusionInputError("weights must be non-negative with a positive sum")
    return weights


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

    Minibatches are drawn uniformly (pretraining, diffusion from data) or, with ``weights`` (n,),
    with probability proportional to them, so the loss is sum_i w_i L_DSM(x_i) / sum_i w_i: with
    w = :func:`boltzlab.finetune.reward_weights` this is reward-weighted regression, whose
    minimiser is the score of the reweighted (tilted) sample. Adam with learning rate ``lr``,
    cosine-decayed to zero. Returns the history (``loss`` per step).
    """
    data = _check_state(data, name="data")
    n_steps, batch_size = _positive_int(n_steps, "n_steps"), _positive_int(batch_size, "batch_size")
    if weights is not None:
        weights = _check_weights(weights, data.shape[0])
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
