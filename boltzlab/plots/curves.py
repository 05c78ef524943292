"""Curves over time: MCMC traces, training curves, evaluations against energy evaluations, reward-KL."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from torch import Tensor

from boltzlab.plots._layout import (
    _as_numpy_1d,
    _axes,
    _scale_axis,
    axis_label,
    panel_grid,
)


def trace_plot(
    traces: Tensor | Mapping[str, Tensor],
    ax: Axes | None = None,
    max_chains: int = 8,
    thin: int = 1,
    xlabel: str = "step",
    ylabel: str = "value",
) -> Axes:
    """MCMC traces: one line per chain.

    ``traces`` is a tensor ``(n_steps,)`` or ``(n_steps, n_chains)`` (the first
    ``max_chains`` chains are drawn, labelled by index) or a dict of name ->
    ``(n_steps,)``. ``thin`` is the number of sampler steps between recorded values,
    so the x axis is in sampler steps.
    """
    if thin < 1:
        raise ValueError(f"thin must be a positive integer, got {thin}")
    if isinstance(traces, Tensor):
        t = traces.detach().to("cpu", torch.float64)
        if t.ndim == 1:
            t = t[:, None]
        if t.ndim != 2:
            raise ValueError(f"traces: expected shape (n_steps,) or (n_steps, n_chains), got {tuple(traces.shape)}")
        series = {f"chain {k}": t[:, k].numpy() for k in range(min(t.shape[1], max_chains))}
    else:
        series = {name: _as_numpy_1d(v, name) for name, v in traces.items()}
    if not series:
        raise ValueError("trace_plot: no traces given")
    ax = _axes(ax, figsize=(7.0, 3.0))
    for name, v in series.items():
        ax.plot(np.arange(v.size) * thin, v, label=name, linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend(fontsize="small", ncols=min(len(series), 4))
    return ax


def _moving_average(v: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(v, np.ones(window) / window, mode="valid")


def training_curve(
    values: Tensor | Sequence[float] | Mapping[str, Tensor | Sequence[float]],
    ax: Axes | None = None,
    smooth: int = 1,
    logy: bool = False,
    xlabel: str = "iteration",
    ylabel: str = "loss",
) -> Axes:
    """A training curve: one value per iteration, or a dict of named curves.

    With ``smooth = w > 1`` each curve is drawn faintly and its moving average over
    ``w`` iterations on top (the average at iteration i covers i - w + 1 .. i).
    ``logy`` needs all values positive.
    """
    curves = dict(values) if isinstance(values, Mapping) else {ylabel: values}
    curves = {name: _as_numpy_1d(v, name) for name, v in curves.items()}
    if not curves or any(v.size == 0 for v in curves.values()):
        raise ValueError("training_curve: no values to plot")
    if smooth < 1:
        raise ValueError(f"smooth must be a positive window length, got {smooth}")
    if logy:
        for name, v in curves.items():
            if np.any(v[np.isfinite(v)] <= 0):
                raise ValueError(f"training_curve: logy=True but {name!r} has values <= 0")
    ax = _axes(ax, figsize=(6.0, 3.5))
    for name, v in curves.items():
        steps = np.arange(v.size)
        if smooth > 1 and v.size >= smooth:
            (line,) = ax.plot(steps, v, alpha=0.3, linewidth=0.8)
            ax.plot(steps[smooth - 1 :], _moving_average(v, smooth), color=line.get_color(),
                    label=f"{name} (mean of {smooth})")
        else:
            ax.plot(steps, v, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(curves) > 1 or smooth > 1:
        ax.legend(fontsize="small")
    return ax




def evaluation_curves(
    evaluations: Sequence[Mapping[str, float]],
    metric_names: Sequence[str],
    x_key: str = "energy_evaluations",
    baseline: Mapping[str, float] | None = None,
    targets: Mapping[str, float] | None = None,
    axes: Sequence[Axes] | None = None,
    label: str = "iDEM",
    baseline_label: str = "MCMC, same budget",
    logx: bool = True,
    logy: Sequence[str] = (),
) -> list[Axes]:
    """Metrics of a sampler's evaluations during training against the work spent on it.

    ``evaluations`` is a list of records (dicts), one per evaluation, each holding ``x_key``
    (by default the energy evaluations spent so far) and every name in ``metric_names``;
    one panel per metric draws the metric against ``x_key``. ``baseline`` (a record with
    ``x_key`` and the same metrics, e.g. MCMC given the sampler's final budget) is drawn as
    a star at its own ``x_key``; ``targets`` (metric -> threshold) as dotted horizontal
    lines. Axis labels are :func:`axis_label` of the keys. The x axis is logarithmic when
    ``logx`` and the evaluations span at least two positive values (one point on a log axis
    has no decade to tick); so is the y axis of each metric named in ``logy``.
    Returns the axes, one per metric.
    """
    if not evaluations:
        raise ValueError("evaluation_curves: no evaluations to plot")
    if not metric_names:
        raise ValueError("evaluation_curves: name at least one metric")
    for k, record in enumerate(evaluations):
        missing = [name for name in (x_key, *metric_names) if name not in record]
        if missing:
            raise ValueError(f"evaluation_curves: evaluation {k} has no {', '.join(map(repr, missing))} "
                             f"(it has {', '.join(map(repr, record))})")
    if baseline is not None and x_key not in baseline:
        raise ValueError(f"evaluation_curves: the baseline has no {x_key!r}")
    if axes is None:
        axes = panel_grid(len(metric_names))[1]
    elif len(axes) != len(metric_names):
        raise ValueError(f"evaluation_curves: {len(axes)} axes given for {len(metric_names)} metrics")
    xs = np.array([float(r[x_key]) for r in evaluations])
    for ax, name in zip(axes, metric_names):
        ax.plot(xs, [float(r[name]) for r in evaluations], "o-", label=label)
        if baseline is not None and name in baseline:
            ax.plot([float(baseline[x_key])], [float(baseline[name])], "*", markersize=12, label=baseline_label)
        if targets is not None and name in targets:
            ax.axhline(float(targets[name]), color="k", linestyle=":", linewidth=1, label=f"target {targets[name]:g}")
        ys = np.array([float(r[name]) for r in evaluations])
        if baseline is not None and name in baseline:
            xs_all, ys = np.append(xs, float(baseline[x_key])), np.append(ys, float(baseline[name]))
        else:
            xs_all = xs
        _scale_axis(ax, "x", xs_all, logx)
        _scale_axis(ax, "y", ys, name in logy)
        ax.set_xlabel(axis_label(x_key))
        ax.set_ylabel(axis_label(name))
        ax.legend(fontsize="small")
    return list(axes)




def reward_kl_tradeoff(
    methods: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    frontier: tuple[Sequence[float], Sequence[float]] | None = None,
    optimum: tuple[float, float] | None = None,
    ax: Axes | None = None,
    xlabel: str = "KL(q || pretrained)  (lower: more natural)",
    ylabel: str = "mean reward E_q[r]",
) -> Axes:
    """Reward against closeness to the pretrained model: one marked line per method.

    ``methods[name] = (kl_values, reward_values)``, one point per setting of that method
    (rounds, alphas, N), drawn in the given order. ``frontier`` = (kl, reward) of the
    tilted family q0 e^{lambda r} / Z (the best reward reachable at each KL) as a dashed
    line; ``optimum`` = (kl, reward) of the target of the fine-tuning as a star.
    """
    if not methods:
        raise ValueError("reward_kl_tradeoff: no methods to plot")
    ax = _axes(ax, figsize=(6.5, 4.5))
    if frontier is not None:
        fx, fy = _as_numpy_1d(frontier[0], "frontier kl"), _as_numpy_1d(frontier[1], "frontier reward")
        if fx.size != fy.size:
            raise ValueError(f"frontier has {fx.size} KL values and {fy.size} rewards")
        ax.plot(fx, fy, "--", color="0.4", label="tilted pretrained (optimal trade-off)")
    for name, (kl, reward) in methods.items():
        x, y = _as_numpy_1d(kl, f"{name} kl"), _as_numpy_1d(reward, f"{name} reward")
        if x.size != y.size or x.size == 0:
            raise ValueError(f"reward_kl_tradeoff: {name!r} has {x.size} KL values and {y.size} rewards")
        ax.plot(x, y, "o-", label=name)
    if optimum is not None:
        ax.plot([optimum[0]], [optimum[1]], "*", color="k", markersize=16, label="exact optimum (alpha = 1)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    return ax


