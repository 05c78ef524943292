"""Distributions: energy and distance histograms against a reference, 2-D densities and samples."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from matplotlib.axes import Axes
from torch import Tensor

from boltzlab import metrics
from boltzlab.energies import Energy
from boltzlab.plots._layout import REFERENCE_STYLE, _axes, _finite_part

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
