"""Comparisons between samplers: ablation bars, seeds, quantile bands of W2, score virials."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes

from boltzlab import metrics
from boltzlab.plots._layout import (
    _as_numpy_1d,
    _axes,
    _scale_axis,
    axis_label,
    panel_grid,
)


def ablation_chart(
    records: Sequence[Mapping[str, object]],
    metric_names: Sequence[str] = ("distance_w2", "distance_tvd", "energy_w2"),
    base: str = "base",
    targets: Mapping[str, float] | None = None,
    axes: Sequence[Axes] | None = None,
) -> list[Axes]:
    """One horizontal bar per ablation variant and one panel per metric (log scale when the
    values span a decade), the ``base`` variant's value as a dashed line, ``targets`` as dotted
    lines. ``records`` are :func:`boltzlab.training.ablation.run_ablation`'s (each with
    ``"variant"`` and the metrics). Bars right of the dashed line: that change made it worse."""
    if not records:
        raise ValueError("ablation_chart: no records to plot")
    names = [str(r.get("variant", "?")) for r in records]
    for name, record in zip(names, records):
        missing = [m for m in metric_names if m not in record]
        if missing:
            raise ValueError(f"ablation_chart: variant {name!r} has no {', '.join(map(repr, missing))}")
    if axes is None:
        axes = panel_grid(len(metric_names), panel_size=(3.1, 0.28 * len(records) + 1.2), sharey=True)[1]
    elif len(axes) != len(metric_names):
        raise ValueError(f"ablation_chart: {len(axes)} axes given for {len(metric_names)} metrics")
    positions = np.arange(len(records))[::-1]
    for ax, metric in zip(axes, metric_names):
        values = np.array([float(r[metric]) for r in records])  # type: ignore[arg-type]
        colors = ["C1" if n == base else "C0" for n in names]
        ax.barh(positions, values, color=colors)
        if base in names:
            ax.axvline(values[names.index(base)], color="k", linestyle="--", linewidth=1)
        if targets is not None and metric in targets:
            ax.axvline(float(targets[metric]), color="C3", linestyle=":", linewidth=1.5)
            values = np.append(values, float(targets[metric]))
        _scale_axis(ax, "x", values, log=True)
        ax.set_xlabel(axis_label(metric))
        ax.set_yticks(positions, names)
    return list(axes)




def seed_curves(
    methods: Mapping[str, tuple[Sequence[tuple[Sequence[float], Sequence[float]]], tuple[float, float, float, float]]],
    optimum: tuple[float, float] | None = None,
    ax: Axes | None = None,
    xlabel: str = "path KL(q || pretrained)",
    ylabel: str = "mean reward E_q[r]",
    colors: Mapping[str, str] | None = None,
    legend: bool = True,
) -> Axes:
    """Reward against KL for several seeds of each method, with the spread of the final point.

    ``methods[name] = (curves, final)``: ``curves`` one (kl_values, reward_values) per seed, drawn as
    thin lines in the method's colour; ``final`` = (mean KL, sd of KL, mean reward, sd of reward) over
    seeds, drawn as a marker with error bars of one standard deviation (the legend entry).
    ``optimum`` = (KL, reward) of the exact optimum, a black star. ``colors[name]``: a method's colour
    (the same method in the same colour across panels); ``legend=False`` leaves the legend to the caller
    (e.g. one ``fig.legend`` below several panels).
    """
    if not methods:
        raise ValueError("seed_curves: no methods to plot")
    ax = _axes(ax, figsize=(6.5, 4.5))
    for name, (seed_lines, final) in methods.items():
        if len(final) != 4:
            raise ValueError(f"seed_curves: {name!r} final must be (kl, kl_sd, reward, reward_sd), got {len(final)} values")
        colour = (colors or {}).get(name)
        for k, (kl, reward) in enumerate(seed_lines):
            x, y = _as_numpy_1d(kl, f"{name} kl"), _as_numpy_1d(reward, f"{name} reward")
            if x.size != y.size or x.size == 0:
                raise ValueError(f"seed_curves: {name!r} seed {k} has {x.size} KL values and {y.size} rewards")
            (line,) = ax.plot(x, y, "-", color=colour, alpha=0.35, linewidth=1)
            colour = line.get_color()
        ax.errorbar([final[0]], [final[2]], xerr=[final[1]], yerr=[final[3]], fmt="o", color=colour, capsize=3,
                    markersize=6, label=name)
    if optimum is not None:
        ax.plot([optimum[0]], [optimum[1]], "*", color="k", markersize=14, label="optimum (importance sampled)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize="small")
    return ax


def seed_strip(
    values: Mapping[str, Sequence[float]],
    ax: Axes | None = None,
    xlabel: str = "gap to the optimum, alpha log Z - (E[r] - alpha KL)",
    reference: float | None = None,
) -> Axes:
    """One row per method, one dot per seed, and the mean as a bar: the spread over seeds at a glance.

    ``values[name]`` = the per-seed numbers; a non-finite one (a diverged run) is drawn as a red
    cross at the right edge and counted in the row's label. ``reference``: a vertical dotted line.
    """
    if not values:
        raise ValueError("seed_strip: nothing to plot")
    ax = _axes(ax, figsize=(6.5, 0.4 * len(values) + 1.2))
    names = list(values)
    finite_all = [v for vs in values.values() for v in _as_numpy_1d(vs, "values") if np.isfinite(v)]
    right = max(finite_all) if finite_all else 1.0
    labels = []
    for row, name in enumerate(names):
        v = _as_numpy_1d(values[name], f"{name} values")
        if v.size == 0:
            raise ValueError(f"seed_strip: {name!r} has no values")
        ok = np.isfinite(v)
        ax.plot(v[ok], np.full(ok.sum(), row), "o", color="C0", alpha=0.7, markersize=5)
        if ok.any():
            ax.plot([v[ok].mean()] * 2, [row - 0.3, row + 0.3], "-", color="k", linewidth=2)
        if (~ok).any():
            ax.plot([right] * int((~ok).sum()), [row] * int((~ok).sum()), "x", color="red", markersize=8)
        labels.append(name if ok.all() else f"{name} ({int((~ok).sum())} diverged)")
    if reference is not None:
        ax.axvline(reference, linestyle=":", color="0.4")
    ax.set_yticks(range(len(names)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    return ax




def _band_label(lo: float, hi: float) -> str:
    return f"{100 * lo:g}-{100 * hi:g}%"


def quantile_band_chart(
    bands_by_name: Mapping[str, Sequence[metrics.QuantileBand]],
    ax: Axes | None = None,
    quantity: str = "distance",
) -> Axes:
    """Grouped bars: for each sampler in ``bands_by_name`` (its
    :func:`~boltzlab.metrics.wasserstein_1d_by_quantile` bands against one reference, all with
    the same edges), what each band of quantile levels adds to W2^2, on a log scale so that the
    small bands stay visible. The legend gives each sampler's W2 (the square root of its bars'
    sum). Tall bars on the right: the tail of long ``quantity`` values is wrong; in the middle:
    the bulk is shifted or stretched."""
    if not bands_by_name:
        raise ValueError("quantile_band_chart: nothing to plot")
    edges = {tuple((b.lo, b.hi) for b in bands) for bands in bands_by_name.values()}
    if len(edges) != 1:
        raise ValueError("quantile_band_chart: the samplers' bands have different edges")
    (pairs,) = edges
    ax = _axes(ax, figsize=(6.5, 3.6))
    width = 0.8 / len(bands_by_name)
    positions = np.arange(len(pairs))
    contributions = []
    for k, (name, bands) in enumerate(bands_by_name.items()):
        values = np.array([b.wp_p for b in bands])
        contributions.append(values)
        ax.bar(positions + (k - (len(bands_by_name) - 1) / 2) * width, values, width,
               label=f"{name} (W2 {math.sqrt(values.sum()):.3g})")
    positive = np.concatenate(contributions)
    positive = positive[positive > 0]
    if positive.size:
        ax.set_yscale("log")
        ax.set_ylim(positive.min() / 2, positive.max() * 2)
    ax.set_xticks(positions, [_band_label(lo, hi) for lo, hi in pairs], rotation=30, ha="right")
    ax.set_xlabel(f"band of quantile levels of the {quantity}s")
    ax.set_ylabel("its part of W2²")
    ax.legend(fontsize="small")
    return ax




def virial_chart(rows: Sequence[Mapping[str, float]], names: Sequence[str], ax: Axes | None = None,
                 labels: Mapping[str, str] | None = None) -> Axes:
    """Mean virial E[(x_t - c) . s(x_t, t)] of several scores against the noise level sigma_t (log
    axis), one line per key in ``names`` of ``rows`` (each row: ``"sigma"``, ``"exact"`` and one value
    per name, as :func:`boltzlab.training.target_bias.virial_by_sigma` writes them), with the exact
    value -d_free (Stein's identity, :func:`boltzlab.metrics.score_virial`) dashed. Above it a
    score pushes particles apart on average; below, it pulls them together."""
    if not rows or not names:
        raise ValueError("virial_chart: nothing to plot")
    missing = [n for n in names if any(n not in r for r in rows)]
    if missing:
        raise ValueError(f"virial_chart: rows lack {', '.join(missing)}")
    ax = _axes(ax, figsize=(6.5, 3.8))
    order = sorted(range(len(rows)), key=lambda i: rows[i]["sigma"])
    sigma = np.array([rows[i]["sigma"] for i in order])
    for name in names:
        ax.plot(sigma, [rows[i][name] for i in order], marker="o", label=(labels or {}).get(name, name))
    ax.plot(sigma, [rows[i]["exact"] for i in order], "k--", label="exact (Stein's identity)")
    ax.set_xscale("log")
    ax.set_xlabel("noise level sigma_t")
    ax.set_ylabel("mean virial (x - c) . s")
    ax.legend(fontsize="small")
    return ax
