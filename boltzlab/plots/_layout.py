"""Figure sizing for the notebook column, axis labels and the helpers every plot shares."""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from torch import Tensor

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
