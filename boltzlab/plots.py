r"""Plots used throughout the course (matplotlib).

Every function draws into ``ax`` when given one and otherwise opens a new figure with
``plt.subplots`` (so that notebooks show it); it returns the ``Axes`` it drew on
(``ax.figure`` is the figure) and never calls ``plt.show``. Numbers printed in legends
are computed by :mod:`boltzlab.metrics`, so a plot and a table never disagree.

=============================  =============================================================
:func:`energy_histogram`       energy histograms of several samplers against a reference,
                               with the energy W2 of each in the legend
:func:`distance_histogram_plot` the same for interatomic distances, with W2 and TVD
:func:`boltzmann_density_grid` p(x) = exp(-E(x)/kT) / Z on a 2-D grid, Z by the grid sum
:func:`density_2d`             that density as an image (or filled contours)
:func:`samples_2d`             a scatter of 2-D samples, to overlay on a density
:func:`trace_plot`             MCMC traces, one line per chain
:func:`training_curve`         a loss (or any metric) per iteration, optionally smoothed
:func:`evaluation_curves`      sampler metrics against energy evaluations, with an MCMC
                               baseline at the same budget and target lines (chapter 06)
:func:`reward_kl_tradeoff`     reward against KL to the pretrained model, with the exact
                               optimum (chapter 08)
:func:`panel_grid`             a figure of several panels that wraps into rows to fit the
                               notebook column (text stays readable, never shrunk)
:func:`axis_label`             the human label of a metric's key (``energy_w2`` -> energy W2)
=============================  =============================================================

Figures are sized for JupyterLab's notebook column: the inline backend draws at
``FIGURE_DPI`` and shows an image at its own pixel size unless it is wider than the column
(``COLUMN_PX``, measured in a 1400x1000 window), where it is shrunk and its text with it.
So no figure here is wider than ``COLUMN_WIDTH_IN`` inches; multi-panel figures wrap.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from torch import Tensor

from boltzlab import metrics
from boltzlab.energies import Energy

__all__ = [
    "panel_grid",
    "axis_label",
    "smallest_text_px",
    "energy_histogram",
    "distance_histogram_plot",
    "boltzmann_density_grid",
    "density_2d",
    "samples_2d",
    "trace_plot",
    "training_curve",
]

REFERENCE_STYLE = dict(color="0.6", alpha=0.5, fill=True, linewidth=0)

FIGURE_DPI = 100  # matplotlib's default dpi, which the inline backend uses
COLUMN_PX = 968  # width of a JupyterLab 4 output area in a 1400 px window, file browser open (measured)
COLUMN_WIDTH_IN = 9.4  # widest figure that fits the column at FIGURE_DPI, with room for the tight bbox

AXIS_LABELS: dict[str, str] = {
    "energy_w2": "energy W2",
    "x_w2": "x-W2",
    "distance_w2": "distance W2",
    "distance_tvd": "distance TVD",
    "distance_w2_tail": "distance W2 from the longest 1% of pairs",
    "beyond_r90": "share beyond the reference's 90% cluster radius",
    "modes_covered": "modes covered",
    "energy_evaluations": "energy evaluations",
    "outer": "outer iteration",
    "loss": "loss",
    "ess_fraction": "ESS / n",
    "log_z": "log Z",
    "sigma_start": "noise level started from (sigma)",
}
"""Human labels of the metric keys that records and configs use (see :func:`axis_label`)."""


def axis_label(key: str) -> str:
    """The label to print for a metric's ``key``: from :data:`AXIS_LABELS`, else the key with
    spaces for underscores (so no raw key like ``energy_w2`` reaches an axis)."""
    return AXIS_LABELS.get(key, key.replace("_", " "))


def panel_grid(
    n_panels: int,
    panel_size: tuple[float, float] = (4.6, 3.4),
    ncols: int | None = None,
    max_width: float = COLUMN_WIDTH_IN,
    **subplot_kw: object,
) -> tuple[plt.Figure, list[Axes]]:
    """A figure of ``n_panels`` axes in rows that fit the notebook column.

    Columns: ``ncols`` if given, else as many ``panel_size``-wide panels as fit in
    ``max_width`` inches; panels narrow (never below the column) so that ``ncols`` of them
    fit. Rows wrap; unused cells are removed. ``subplot_kw`` go to ``plt.subplots``
    (``sharex``, ``sharey``, ...). Returns ``(fig, axes)`` with ``axes`` a flat list in
    row-major order. Uses constrained layout, so labels stay inside the figure.
    """
    if isinstance(n_panels, bool) or not isinstance(n_panels, int) or n_panels < 1:
        raise ValueError(f"n_panels must be a positive int, got {n_panels!r}")
    width, height = (float(v) for v in panel_size)
    if not (width > 0 and height > 0 and max_width > 0):
        raise ValueError(f"panel_size and max_width must be positive, got {panel_size}, {max_width}")
    if ncols is None:
        ncols = max(1, min(n_panels, int(max_width // width)))
    elif isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    ncols = min(ncols, n_panels)
    if ncols * width > max_width:  # shrink the panels, keep the aspect ratio
        height *= max_width / (ncols * width)
        width = max_width / ncols
    nrows = math.ceil(n_panels / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(ncols * width, nrows * height), squeeze=False,
                             layout="constrained", **subplot_kw)
    axes = list(grid.ravel())
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def smallest_text_px(fig: plt.Figure, column_px: float = COLUMN_PX) -> float:
    """The height in screen pixels of the smallest visible text in ``fig`` as the notebook
    shows it: font size at ``fig.dpi``, times the shrink factor when the figure is wider than
    ``column_px``. The course aims for at least 10 px."""
    sizes = [t.get_fontsize() for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
             if t.get_visible() and t.get_text().strip()]
    if not sizes:
        raise ValueError("smallest_text_px: the figure has no visible text")
    width_px = fig.get_figwidth() * fig.dpi
    return min(sizes) * fig.dpi / 72.0 * min(1.0, column_px / width_px)


def _axes(ax: Axes | None, figsize: tuple[float, float] = (6.0, 4.0)) -> Axes:
    if ax is not None:
        return ax
    _, new_ax = plt.subplots(figsize=figsize)
    return new_ax


def _as_numpy_1d(values: Tensor | Sequence[float], name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to("cpu", torch.float64).reshape(-1).numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {arr.shape}")
    return arr


def _finite_part(values: Tensor, name: str) -> tuple[Tensor, int]:
    """Drop NaN/inf values, returning the rest (float64, flat) and how many were dropped."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(values).__name__}")
    v = values.detach().reshape(-1).to("cpu", torch.float64)
    finite = torch.isfinite(v)
    kept = v[finite]
    if kept.numel() == 0:
        raise ValueError(f"{name}: no finite values to plot ({v.numel()} given)")
    return kept, int((~finite).sum())


MAX_STRETCH = 10.0
"""How much wider than the reference's own window a histogram's range may grow to show a sampler."""


def _central_range(values: Tensor, pad: float = 0.05) -> tuple[float, float]:
    lo, hi = (float(q) for q in torch.quantile(values, values.new_tensor([0.001, 0.999])))
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    width = hi - lo
    return lo - pad * width, hi + pad * width


def _plot_range(reference: Tensor | None, others: Sequence[Tensor], pad: float = 0.05) -> tuple[float, float]:
    """The central 99.8% of the reference (or of everything), padded, widened to cover the
    samplers' central 99.8% too unless that makes it more than ``MAX_STRETCH`` times wider:
    a diverged sampler's huge values must not squash the reference into one bin (the
    fraction outside is then drawn as edge bars, see :func:`_outside_bars`)."""
    if reference is None:
        return _central_range(torch.cat(list(others)), pad)
    lo, hi = _central_range(reference, pad)
    if not others:
        return lo, hi
    wide = [_central_range(v, pad) for v in others]
    union = min(lo, *(a for a, _ in wide)), max(hi, *(b for _, b in wide))
    if union[1] - union[0] <= MAX_STRETCH * (hi - lo):
        return union
    return lo, hi


def _percent(fraction: float) -> str:
    return "<0.1%" if 0 < fraction < 0.0005 else f"{100 * fraction:.1f}%"


def _sampler_label(name: str, scores: str, hist: metrics.Histogram, n_dropped: int) -> str:
    """Name on the first line, numbers on the next ones (a legend must fit a narrow panel)."""
    notes = [scores]
    outside = hist.below + hist.above
    if outside > 0:
        notes.append(f"{_percent(outside)} outside the range (edge bars)")
    if n_dropped:
        notes.append(f"{n_dropped} non-finite dropped")
    return "\n".join([name, *notes])


def _outside_bars(ax: Axes, hist: metrics.Histogram, slot: int, color: str) -> None:
    """Draw the mass below and above the histogram's range as hatched bars just beyond its
    edges, with area equal to that fraction (the same density units as the bins), so a
    sampler whose values all fall outside still shows. ``slot`` offsets the bars of
    several samplers so they do not overlap."""
    edges = hist.edges.numpy()
    step = float(edges[1] - edges[0])
    width = 3 * step
    offset = step + slot * (width + step)
    for fraction, x in ((hist.below, edges[0] - offset - width), (hist.above, edges[-1] + offset)):
        if fraction > 0:
            ax.bar(x, fraction / width, width=width, align="edge", color=color, alpha=0.35, hatch="//",
                   edgecolor=color, linewidth=1.0)
            ax.annotate(_percent(fraction), (x + width / 2, fraction / width), ha="center", va="bottom",
                        fontsize="small", color=color)


def _stairs(ax: Axes, hist: metrics.Histogram, label: str, **style: object) -> str:
    """Draw ``hist`` as a step density; return the colour used (for its edge bars)."""
    artist = ax.stairs(hist.density.numpy(), hist.edges.numpy(), label=label, **style)
    return artist.get_edgecolor() if not style.get("fill") else artist.get_facecolor()


def energy_histogram(
    samples_energies: Mapping[str, Tensor],
    reference: Tensor | None = None,
    bins: int = 100,
    range: tuple[float, float] | None = None,
    ax: Axes | None = None,
    reference_label: str = "reference",
    xlabel: str = "energy E(x)",
) -> Axes:
    """Energy histograms of several samplers, each against a reference.

    ``samples_energies`` maps a sampler's name to its energies ``(n,)``; ``reference``
    (``(m,)``) is drawn filled in grey. With a reference, each sampler's legend entry
    gives its energy W2 (:func:`boltzlab.metrics.energy_w2`, W2 not W2^2) against it.
    ``range`` defaults to the central 99.8% of the reference (or of all energies)
    plus 5% on each side, widened to the samplers' central 99.8% unless that is more than
    ``MAX_STRETCH`` times wider. The share of a sampler's energies outside the range is
    printed in the legend and drawn as hatched bars beyond the edges (area = that share);
    NaN/inf energies are dropped and counted in the legend.
    Each histogram is a density: its bins and edge bars together have area 1.
    """
    if not samples_energies and reference is None:
        raise ValueError("energy_histogram: nothing to plot (no sampler energies, no reference)")
    ax = _axes(ax)
    ref = _finite_part(reference, reference_label)[0] if reference is not None else None
    finite = {name: _finite_part(e, name) for name, e in samples_energies.items()}
    if range is None:
        range = _plot_range(ref, [v for v, _ in finite.values()])
    if ref is not None:
        _stairs(ax, metrics.histogram(ref, bins, range), reference_label, **REFERENCE_STYLE)
    for slot, (name, (energies, n_dropped)) in enumerate(finite.items()):
        hist = metrics.histogram(energies, bins, range)
        scores = f"W2 = {metrics.energy_w2(energies, ref):.3g}" if ref is not None else f"n = {energies.numel()}"
        color = _stairs(ax, hist, _sampler_label(name, scores, hist, n_dropped), linewidth=1.5)
        _outside_bars(ax, hist, slot, color)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return ax


def distance_histogram_plot(
    samples_x: Mapping[str, Tensor],
    n_particles: int,
    spatial_dim: int,
    reference: Tensor | None = None,
    bins: int = 100,
    range: tuple[float, float] | None = None,
    ax: Axes | None = None,
    reference_label: str = "reference",
) -> Axes:
    r"""Interatomic-distance histograms of several samplers against a reference.

    ``samples_x`` maps a name to configurations ``(n, n_particles * spatial_dim)``;
    ``reference`` is ``(m, n_particles * spatial_dim)``. With a reference each legend
    entry gives the distance W2 (:func:`boltzlab.metrics.distance_w2`) and the TVD
    between the two histograms drawn (:func:`boltzlab.metrics.histogram_tvd` on these
    ``bins`` and ``range``, mass outside the range included). ``range`` defaults to
    the reference's central 99.8% of distances plus 5% on each side, widened as in
    :func:`energy_histogram`; mass outside it is drawn as hatched edge bars.
    """
    if not samples_x and reference is None:
        raise ValueError("distance_histogram_plot: nothing to plot (no samples, no reference)")
    ax = _axes(ax)
    d_ref = metrics.interatomic_distances(reference, n_particles, spatial_dim) if reference is not None else None
    dists = {name: metrics.interatomic_distances(x, n_particles, spatial_dim) for name, x in samples_x.items()}
    if range is None:
        range = _plot_range(d_ref, list(dists.values()))
    h_ref = metrics.histogram(d_ref, bins, range) if d_ref is not None else None
    if h_ref is not None:
        _stairs(ax, h_ref, reference_label, **REFERENCE_STYLE)
    for slot, (name, d) in enumerate(dists.items()):
        hist = metrics.histogram(d, bins, range)
        if d_ref is not None and h_ref is not None:
            w2 = metrics.wasserstein_1d(d, d_ref, p=2.0)
            scores = f"W2 = {w2:.3g}, TVD = {metrics.histogram_tvd(hist, h_ref):.3g}"
        else:
            scores = f"n = {d.numel()} distances"
        color = _stairs(ax, hist, _sampler_label(name, scores, hist, 0), linewidth=1.5)
        _outside_bars(ax, hist, slot, color)
    ax.set_xlabel("interatomic distance")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
    return ax


def boltzmann_density_grid(
    energy: Energy,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    kT: float | None = None,
    grid: int = 200,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The Boltzmann density of a 2-D energy on a grid of ``grid × grid`` cells.

    Cell centres x_i, y_j cover ``xlim × ylim``; with cell area A = Δx Δy,

        p_ij = exp(-E(x_i, y_j)/kT) / (A · Σ_kl exp(-E(x_k, y_l)/kT)),

    so that Σ p_ij A = 1 (normalised numerically on the window, in float64 with a
    logsumexp). ``kT`` defaults to ``energy.kT``. Returns ``(xs (grid,), ys (grid,),
    p (grid, grid))`` with ``p[j, i]`` at (xs[i], ys[j]) (rows are y, as images are).
    """
    if energy.dim != 2:
        raise ValueError(f"boltzmann_density_grid needs a 2-D energy, {energy.name} has dim {energy.dim}")
    kT = energy.kT if kT is None else float(kT)
    if not (kT > 0 and math.isfinite(kT)):
        raise ValueError(f"kT must be positive and finite, got {kT}")
    xs, ys, points, cell_area = metrics.grid_2d(xlim, ylim, grid)
    log_p = -energy.energy(points) / kT
    p = torch.exp(log_p - torch.logsumexp(log_p.reshape(-1), 0)) / cell_area
    return xs, ys, p


def density_2d(
    energy: Energy,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    kT: float | None = None,
    grid: int = 200,
    ax: Axes | None = None,
    kind: str = "image",
    cmap: str = "viridis",
    colorbar: bool = True,
) -> Axes:
    """Draw the normalised Boltzmann density of a 2-D energy (see :func:`boltzmann_density_grid`).

    ``kind="image"`` draws one pixel per grid cell exactly covering ``xlim × ylim``
    (the image's array is the density p); ``kind="contour"`` draws filled contours.
    """
    if kind not in ("image", "contour"):
        raise ValueError(f"kind must be 'image' or 'contour', got {kind!r}")
    ax = _axes(ax, figsize=(5.0, 4.0))
    xs, ys, p = boltzmann_density_grid(energy, xlim, ylim, kT, grid)
    if kind == "image":
        art = ax.imshow(p.numpy(), origin="lower", extent=(*xlim, *ylim), aspect="auto", cmap=cmap)
    else:
        art = ax.contourf(xs.numpy(), ys.numpy(), p.numpy(), levels=20, cmap=cmap)
    if colorbar:
        ax.figure.colorbar(art, ax=ax, label="p(x)")
    kT_used = energy.kT if kT is None else kT
    ax.set_title(f"{energy.name}, kT = {kT_used:.3g}")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax


def samples_2d(
    x: Tensor,
    ax: Axes | None = None,
    max_points: int = 5000,
    label: str | None = None,
    color: str | None = "white",
    size: float = 3.0,
    alpha: float = 0.5,
) -> Axes:
    """Scatter 2-D samples ``(n, 2)``, e.g. over :func:`density_2d`.

    At most ``max_points`` are drawn, evenly strided through the set (deterministic,
    and for a chain it spreads the points over the whole run).
    """
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"samples_2d expects a tensor of shape (n, 2), got {shape}")
    ax = _axes(ax, figsize=(5.0, 4.0))
    stride = max(1, math.ceil(x.shape[0] / max_points))
    pts = x[::stride].detach().to("cpu", torch.float64).numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=size, alpha=alpha, color=color, label=label, linewidths=0)
    return ax


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


def _scale_axis(ax: Axes, axis: str, values: np.ndarray, log: bool) -> None:
    """Log scale on ``axis`` ("x" or "y") when asked and the positive ``values`` span at least a
    decade; otherwise a linear axis with a few plain ticks, also around a single value (less than
    a decade on a log axis labels its minor ticks, which overlap in a narrow panel)."""
    from matplotlib.ticker import MaxNLocator

    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    if log and lo > 0 and hi >= 10 * lo:
        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        return
    if hi == lo:  # one value: a window of +-50% around it (or +-1 around zero)
        half = 0.5 * abs(lo) or 1.0
        (ax.set_xlim if axis == "x" else ax.set_ylim)(lo - half, hi + half)
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(nbins=4))
    ax.ticklabel_format(axis=axis, style="sci", scilimits=(-3, 4), useMathText=True)


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


__all__ += ["evaluation_curves"]


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


__all__ += ["reward_kl_tradeoff"]


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


__all__ += ["ablation_chart"]


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


__all__ += ["seed_curves", "seed_strip"]


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


__all__ += ["quantile_band_chart"]
