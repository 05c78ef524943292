r"""Interactive widgets of the chapters (ipywidgets + matplotlib).

Every widget is built from one generic helper, :func:`slider_figure`: a row of
controls above an ``ipywidgets.Image`` holding a PNG that is redrawn whenever a control
changes. The drawing is a plain function ``update_fn(fig, **values)`` that draws into a
fresh matplotlib ``Figure`` and may return a state object (the numbers it showed), so
a widget's logic is tested without a browser: build it, set a control's ``value``,
and read ``widget.image.value`` (PNG bytes) and ``widget.state``.

Figures are created with ``matplotlib.figure.Figure`` (not ``pyplot``) so that
redraws neither pile up open figures nor get displayed a second time by the inline
backend, and the output is an image, never printed text (notebook tests compare text).

Sizes are in screen pixels: the PNG is drawn at ``dpi`` (100, the inline backend's) and the
image widget is pinned to the PNG's own pixel size, so the browser shows it 1:1 (left to
itself it stretches a small PNG across the column: blurry, and taller than the window).
A widget's figure is at most :data:`MAX_WIDGET_PX` wide and tall, so that its controls
and the whole figure fit in a 1400x1000 JupyterLab window together. Sliders are
:data:`SLIDER_WIDTH` wide, so that a step is a few pixels, not one.

Widgets here:

- :func:`temperature_widget`: p_T(x) ∝ exp(-E(x)/kT) of a 2-D energy for a kT slider,
  with the exact probability of the double well's deep well in the title (chapter 00).
- :func:`log_z_spread_widget`: the spread of importance-sampling log Z estimates over the
  sample size, for several proposals (chapter 07).
- :func:`reverse_sde_widget`: reverse-SDE samples over the exact noised density p_t of a
  Gaussian mixture for a slider over t, with the modes covered (chapter 06).
- :func:`flow_layers_widget`: the density of a 2-D flow after each of its coupling layers
  (chapter 02).
- :func:`annealing_widget`: the rungs of a temperature-annealing curriculum, tempered target
  and the flow's samples at each rung (chapter 03).
- :func:`noised_score_widget`: the exact noised density p_sigma of a Gaussian mixture and its
  score field for a log slider over sigma, with a learned score's arrows and error next to
  the exact ones (chapter 04).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import ipywidgets
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from boltzlab.energies import DoubleWell2D, Energy, GaussianMixture
from boltzlab.importance import SubsampleEstimates, normalized_ess, subsample_estimates
from boltzlab.plots import COLUMN_PX, FIGURE_DPI, boltzmann_density_grid

__all__ = [
    "figure_to_png",
    "SliderFigure",
    "slider_figure",
    "TemperatureView",
    "temperature_view",
    "draw_temperature_view",
    "temperature_widget",
    "DEFAULT_WINDOWS",
]


MAX_WIDGET_PX = (COLUMN_PX - 28, 640)  # (width, height): the column less a margin; a 1000 px window less
# JupyterLab's bars and the controls' row
SLIDER_WIDTH = "440px"
SLIDERS = (ipywidgets.IntSlider, ipywidgets.FloatSlider, ipywidgets.FloatLogSlider, ipywidgets.SelectionSlider)


def figure_to_png(fig: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """Render a matplotlib figure to PNG bytes (Agg), without pyplot."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class SliderFigure(ipywidgets.VBox):
    """Controls above a PNG image that ``update_fn(fig, **values)`` redraws on every change.

    Attributes: ``controls`` (name -> control widget), ``image`` (``ipywidgets.Image``),
    ``state`` (what the last ``update_fn`` call returned). Build with :func:`slider_figure`.
    """

    def __init__(
        self,
        update_fn: Callable[..., Any],
        controls: Mapping[str, ipywidgets.ValueWidget],
        figsize: tuple[float, float] = (6.4, 4.6),
        dpi: int = FIGURE_DPI,
    ) -> None:
        width_px, height_px = round(figsize[0] * dpi), round(figsize[1] * dpi)
        if width_px > MAX_WIDGET_PX[0] or height_px > MAX_WIDGET_PX[1]:
            raise ValueError(f"figsize {figsize} at {dpi} dpi is {width_px}x{height_px} px; a widget's figure must fit "
                             f"{MAX_WIDGET_PX[0]}x{MAX_WIDGET_PX[1]} px to sit in the column with its controls in view")
        # pinned to the PNG's pixel size: the browser then shows it 1:1 instead of stretching it
        image = ipywidgets.Image(format="png", layout=ipywidgets.Layout(
            width=f"{width_px}px", height=f"{height_px}px", object_fit="contain"))
        for control in controls.values():
            if isinstance(control, SLIDERS) and control.layout.width is None:
                control.layout.width = SLIDER_WIDTH
        super().__init__(children=[ipywidgets.HBox(list(controls.values()), layout=ipywidgets.Layout(
            flex_flow="row wrap")), image])
        self.update_fn = update_fn
        self.controls = dict(controls)
        self.image = image
        self.figsize = figsize
        self.dpi = dpi
        self.state: Any = None
        for control in self.controls.values():
            control.observe(self._on_change, names="value")
        self.refresh()

    @property
    def values(self) -> dict[str, Any]:
        """The controls' current values, as passed to ``update_fn``."""
        return {name: control.value for name, control in self.controls.items()}

    def refresh(self) -> None:
        """Redraw: call ``update_fn`` on a fresh figure and show it as a PNG."""
        fig = Figure(figsize=self.figsize, dpi=self.dpi, layout="constrained")
        self.state = self.update_fn(fig, **self.values)
        self.image.value = figure_to_png(fig, self.dpi)

    def _on_change(self, change: dict[str, Any]) -> None:
        self.refresh()

    def __repr__(self) -> str:
        # the default repr embeds the PNG bytes, which would land in the notebook's
        # text/plain output and make output comparisons depend on the renderer
        controls = ", ".join(f"{name}={value!r}" for name, value in self.values.items())
        return f"{type(self).__name__}({controls})"


def slider_figure(
    update_fn: Callable[..., Any],
    figsize: tuple[float, float] = (6.4, 4.6),
    dpi: int = FIGURE_DPI,
    **controls: ipywidgets.ValueWidget,
) -> SliderFigure:
    """A widget that redraws ``update_fn(fig, **values)`` whenever a control changes.

    Example::

        def draw(fig, kT):
            ax = fig.add_subplot()
            ax.plot(x, torch.exp(-E / kT))
            return {"kT": kT}

        slider_figure(draw, kT=ipywidgets.FloatSlider(value=1.0, min=0.1, max=5.0))

    Each keyword is a control whose ``value`` is passed to ``update_fn`` under that name.
    ``figsize`` is in inches at ``dpi``: at most :data:`MAX_WIDGET_PX` pixels.
    """
    if not controls:
        raise ValueError("slider_figure needs at least one control (e.g. kT=ipywidgets.FloatSlider(...))")
    for name, control in controls.items():
        if not isinstance(control, ipywidgets.ValueWidget):
            raise ValueError(f"control {name!r} is a {type(control).__name__}, not an ipywidgets value widget")
    return SliderFigure(update_fn, controls, figsize=figsize, dpi=dpi)


# ----------------------------------------------------------------------------------------
# temperature
# ----------------------------------------------------------------------------------------

Window = tuple[tuple[float, float], tuple[float, float]]

DEFAULT_WINDOWS: dict[str, Window] = {
    "double_well_2d": ((-3.0, 3.0), (-5.0, 5.0)),
    "gmm40": ((-50.0, 50.0), (-50.0, 50.0)),
    "muller_brown": ((-1.5, 1.2), (-0.5, 2.0)),
}
"""Plot windows (xlim, ylim) by energy name; they hold nearly all of the mass for
kT up to about 10 (in the energy's own units)."""


@dataclass(frozen=True)
class TemperatureView:
    """What :func:`temperature_view` computed: the density on the grid and its numbers."""

    energy_name: str
    kT: float
    xs: Tensor  # (grid,) cell centres in x1
    ys: Tensor  # (grid,) cell centres in x2
    density: Tensor  # (grid, grid), density[j, i] at (xs[i], ys[j]), sums to 1 / cell area
    deep_well_probability: float | None  # exact P(x1 < 0) for the double well, else None
    deep_well_mass_on_grid: float | None  # the same probability from the grid density

    @property
    def title(self) -> str:
        text = f"{self.energy_name}, kT = {self.kT:.3g}"
        if self.deep_well_probability is not None:
            text += f": P(deep well, $x_1 < 0$) = {self.deep_well_probability:.3f}"
        return text


def temperature_view(
    energy: Energy, kT: float, window: Window, grid: int = 150, label: str | None = None
) -> TemperatureView:
    r"""p_T(x) = exp(-E(x)/kT) / Z_T on a grid over ``window``, and for a double well
    the exact deep-well probability P(x1 < 0) = ∫_{x1<0} p_T (by quadrature in
    :meth:`DoubleWell2D.well_probabilities`) next to the same mass summed on the grid.
    ``label`` names the energy in the title (default: ``energy.name``)."""
    (xlim, ylim) = window
    xs, ys, density = boltzmann_density_grid(energy, xlim, ylim, kT=kT, grid=grid)
    p_exact = p_grid = None
    if isinstance(energy, DoubleWell2D):
        p_exact = energy.at_temperature(kT).well_probabilities()[0]
        cell_area = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
        p_grid = float(density[:, xs < 0].sum()) * cell_area
    return TemperatureView(label or energy.name, float(kT), xs, ys, density, p_exact, p_grid)


def _density_image(fig: Figure, xs: Tensor, ys: Tensor, density: Tensor, label: str) -> Axes:
    """A density on a grid (cell centres ``xs``, ``ys``) as an image with a colour bar."""
    ax = fig.add_subplot()
    half_dx, half_dy = 0.5 * float(xs[1] - xs[0]), 0.5 * float(ys[1] - ys[0])
    extent = (float(xs[0]) - half_dx, float(xs[-1]) + half_dx, float(ys[0]) - half_dy, float(ys[-1]) + half_dy)
    image = ax.imshow(density.numpy(), origin="lower", extent=extent, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label=label)
    return ax


def draw_temperature_view(fig: Figure, view: TemperatureView) -> None:
    """Draw a :class:`TemperatureView` as an image with a colour bar into ``fig``."""
    ax = _density_image(fig, view.xs, view.ys, view.density, "$p_T(x)$")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title(view.title, fontsize="medium")


def temperature_widget(
    energies: Mapping[str, Energy] | None = None,
    kT_range: tuple[float, float] = (0.1, 10.0),
    kT: float = 1.0,
    windows: Mapping[str, Window] | None = None,
    grid: int = 150,
) -> SliderFigure:
    r"""Explore p_T(x) ∝ exp(-E(x)/kT) of 2-D energies with a log-scale kT slider.

    ``energies`` maps a label (shown in the dropdown) to a 2-D energy; the default is
    the double well and GMM-40. ``windows`` maps the same labels to ((x0, x1), (y0, y1));
    by default they come from :data:`DEFAULT_WINDOWS` by energy name. The density is
    normalised numerically on the window. For the double well the title shows the
    exact probability of the deep well (x1 < 0) at that temperature.
    ``widget.state`` is the :class:`TemperatureView` on display.
    """
    if energies is None:
        energies = {"double well": DoubleWell2D(), "GMM-40": GaussianMixture()}
    if not energies:
        raise ValueError("temperature_widget needs at least one energy")
    lo, hi = kT_range
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"kT_range must be two positive numbers lo < hi, got {kT_range}")
    if not lo <= kT <= hi:
        raise ValueError(f"kT = {kT} is outside kT_range {kT_range}")
    chosen_windows: dict[str, Window] = {}
    for label, energy in energies.items():
        if energy.dim != 2:
            raise ValueError(f"{label!r}: temperature_widget shows 2-D energies, {energy.name} has dim {energy.dim}")
        window = (windows or {}).get(label, DEFAULT_WINDOWS.get(energy.name))
        if window is None:
            raise ValueError(f"no plot window for {label!r} ({energy.name}); pass windows={{{label!r}: ((x0, x1), (y0, y1))}}")
        chosen_windows[label] = window

    def update(fig: Figure, energy: str, kT: float) -> TemperatureView:
        view = temperature_view(energies[energy], kT, chosen_windows[energy], grid, label=energy)
        draw_temperature_view(fig, view)
        return view

    kT_slider = ipywidgets.FloatLogSlider(
        value=kT, base=10, min=math.log10(lo), max=math.log10(hi), step=0.02,
        description="kT", continuous_update=False, readout_format=".3g",
    )
    energy_menu = ipywidgets.Dropdown(options=list(energies), value=next(iter(energies)), description="energy")
    return slider_figure(update, figsize=(6.4, 4.8), energy=energy_menu, kT=kT_slider)


# ----------------------------------------------------------------------------------------
# importance sampling: the spread of log Ẑ over the sample size (chapter 07)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogZSpreadView:
    """What :func:`log_z_spread_view` computed: ``n_draws`` subsamples of ``size`` weights per
    proposal, their log Ẑ and Kish ESS, next to the ESS fraction of each whole pool."""

    size: int
    estimates: dict[str, SubsampleEstimates]
    pool_ess_fraction: dict[str, float]
    log_z_exact: float | None

    def mean(self, name: str) -> float:
        """Mean of log Ẑ over the draws of proposal ``name``."""
        return float(self.estimates[name].log_z.mean())

    def std(self, name: str) -> float:
        """Standard deviation of log Ẑ over the draws (the estimator's spread at this size)."""
        return float(self.estimates[name].log_z.std())

    def median_ess_fraction(self, name: str) -> float:
        """Median over the draws of ESS / size."""
        return float(self.estimates[name].ess_fraction.median())


def log_z_spread_view(log_weights: Mapping[str, Tensor], size: int, n_draws: int = 500,
                      log_z_exact: float | None = None, seed: int = 0) -> LogZSpreadView:
    """Subsample each pool of log-weights ``(n,)`` in ``log_weights`` ``n_draws`` times at ``size``
    (:func:`boltzlab.importance.subsample_estimates`, seeded by ``seed`` and ``size``)."""
    if not log_weights:
        raise ValueError("log_z_spread_view needs at least one pool of log-weights")
    estimates, pool = {}, {}
    for k, (name, log_w) in enumerate(log_weights.items()):
        if isinstance(log_w, Tensor) and log_w.ndim == 1 and size > log_w.numel():
            raise ValueError(f"{name!r}: size {size} exceeds the pool of {log_w.numel()} log-weights; draws larger "
                             f"than the pool would only repeat it")
        generator = torch.Generator().manual_seed(seed + 7919 * k + size)
        estimates[name] = subsample_estimates(log_w, size, n_draws, generator=generator)
        pool[name] = normalized_ess(log_w)
    return LogZSpreadView(int(size), estimates, pool, log_z_exact)


def draw_log_z_spread(fig: Figure, view: LogZSpreadView) -> None:
    """Two panels: histograms of log Ẑ over the draws (with the exact log Z), and of ESS / size
    (with each whole pool's ESS fraction as a dashed line)."""
    ax_z, ax_e = fig.subplots(1, 2)
    all_z = torch.cat([e.log_z for e in view.estimates.values()])
    lo, hi = (float(v) for v in torch.quantile(all_z, torch.tensor([0.005, 0.995], dtype=all_z.dtype)))
    if view.log_z_exact is not None:
        lo, hi = min(lo, view.log_z_exact), max(hi, view.log_z_exact)
    pad = 0.05 * (hi - lo) + 1e-3
    edges = np.linspace(lo - pad, hi + pad, 41)
    colours = [f"C{k}" for k in range(len(view.estimates))]
    for colour, (name, est) in zip(colours, view.estimates.items()):
        ax_z.hist(est.log_z.clamp(edges[0], edges[-1]).numpy(), bins=edges, histtype="step", lw=1.5, color=colour,
                  label=f"{name}: {view.mean(name):.3f} ± {view.std(name):.3f}")
        ax_e.hist(est.ess_fraction.numpy(), bins=np.linspace(0, 1, 33), histtype="step", lw=1.5, color=colour,
                  label=f"{name}: median {view.median_ess_fraction(name):.2f}")
        ax_e.axvline(view.pool_ess_fraction[name], color=colour, ls="--", lw=1)
    if view.log_z_exact is not None:
        ax_z.axvline(view.log_z_exact, color="k", lw=1, label=f"exact log Z = {view.log_z_exact:.3f}")
    ax_z.set(xlabel=r"$\log \hat Z$ of one experiment", ylabel="draws",
             title=f"log Z from n = {view.size} samples (mean ± sd)")
    ax_e.set(xlabel="ESS / n of one experiment", ylabel="draws", title="Kish ESS / n (dashed: whole pool)")
    ax_z.legend(fontsize="small")
    ax_e.legend(fontsize="small")


def log_z_spread_widget(log_weights: Mapping[str, Tensor], log_z_exact: float | None = None,
                        sizes: Sequence[int] = (16, 64, 256, 1024, 4096), n_draws: int = 500, seed: int = 0,
                        size: int | None = None) -> SliderFigure:
    r"""How the log Z estimate of importance sampling spreads with the sample size n.

    ``log_weights`` maps a proposal's label to a large pool of its log-weights ``(N,)``; each
    slider position ``n`` in ``sizes`` redraws ``n_draws`` experiments of n samples from every
    pool and shows the histogram of their log Ẑ = logsumexp(log w) - log n (with the exact
    log Z if given) and of their ESS / n. The spread shrinks like 1/sqrt(n); a proposal that
    misses part of p shrinks it just as well, around the wrong value. ``widget.state`` is
    the :class:`LogZSpreadView` on display.
    """
    if not log_weights:
        raise ValueError("log_z_spread_widget needs at least one pool of log-weights")
    options = [int(s) for s in sizes]
    if not options or any(s < 1 for s in options) or options != sorted(set(options)):
        raise ValueError(f"sizes must be increasing positive sample sizes, got {tuple(sizes)}")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 2:
        raise ValueError(f"n_draws must be an int >= 2 (a spread needs two draws), got {n_draws!r}")
    start = options[len(options) // 2] if size is None else int(size)
    if start not in options:
        raise ValueError(f"size {size} is not one of sizes {tuple(options)}")

    def update(fig: Figure, n: int) -> LogZSpreadView:
        view = log_z_spread_view(log_weights, n, n_draws, log_z_exact, seed)
        draw_log_z_spread(fig, view)
        return view

    slider = ipywidgets.SelectionSlider(options=options, value=start, description="n samples",
                                        continuous_update=False)
    return slider_figure(update, figsize=(9.3, 4.0), n=slider)


__all__ += ["LogZSpreadView", "draw_log_z_spread", "log_z_spread_view", "log_z_spread_widget"]


# ----------------------------------------------------------------------------------------
# diffusion samplers: GMM-40 samples along the reverse SDE (chapter 06)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenoisingView:
    """One frame of :func:`reverse_sde_widget`: the samples at time ``t`` of the reverse SDE
    next to the exact noised density p_t = p * N(0, sigma_t^2 I) of the mixture."""

    index: int  # position in the trajectory (0: t = 1, the prior)
    t: float
    sigma: float  # sigma_t of the schedule
    samples: Tensor  # (B, 2) the states at t
    xs: Tensor  # (grid,) cell centres in x1
    ys: Tensor  # (grid,) cell centres in x2
    density: Tensor  # (grid, grid) exact p_t on the window, density[j, i] at (xs[i], ys[j])
    modes_covered: int  # modes of p_t covered by the samples (metrics.mode_coverage at width sqrt(s^2 + sigma_t^2))
    n_modes: int

    @property
    def title(self) -> str:
        return (f"t = {self.t:.3f}, $\\sigma_t$ = {self.sigma:.3g}: "
                f"{self.modes_covered}/{self.n_modes} modes of $p_t$ covered")


def _check_trajectory(trajectory: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(trajectory, Tensor) or trajectory.ndim != 3 or trajectory.shape[-1] != 2:
        shape = tuple(trajectory.shape) if isinstance(trajectory, Tensor) else type(trajectory).__name__
        raise ValueError(f"trajectory must be a tensor of shape (n_steps + 1, B, 2) of 2-D states, got {shape}")
    if not isinstance(times, Tensor) or times.ndim != 1 or times.shape[0] != trajectory.shape[0]:
        shape = tuple(times.shape) if isinstance(times, Tensor) else type(times).__name__
        raise ValueError(f"times must have shape ({trajectory.shape[0]},), one time per trajectory frame; got {shape}")
    if not bool(torch.isfinite(trajectory).all()) or not bool(torch.isfinite(times).all()):
        raise ValueError("trajectory and times must be finite (a diverged reverse SDE gives NaN or inf)")
    if bool((times < 0).any()) or bool((times > 1).any()):
        raise ValueError(f"times must lie in [0, 1], got values from {float(times.min())} to {float(times.max())}")
    return trajectory.detach().to("cpu", torch.float64), times.detach().to("cpu", torch.float64)


def denoising_view(trajectory: Tensor, times: Tensor, schedule: Any, index: int,
                   mixture: GaussianMixture | None = None, window: Window | None = None,
                   grid: int = 120) -> DenoisingView:
    r"""Frame ``index`` of a reverse-SDE ``trajectory`` ``(n_steps + 1, B, 2)`` at ``times``
    ``(n_steps + 1,)``: its samples and the exact p_t of ``mixture`` (default GMM-40), which
    convolved with N(0, sigma_t^2 I) is the same mixture with width sqrt(s^2 + sigma_t^2).
    ``schedule`` is a :class:`boltzlab.diffusion.GeometricNoiseSchedule` (anything with ``std(t)``)."""
    from boltzlab.metrics import mode_coverage

    trajectory, times = _check_trajectory(trajectory, times)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < times.shape[0]:
        raise ValueError(f"index must be an int in [0, {times.shape[0] - 1}], got {index!r}")
    mixture = GaussianMixture() if mixture is None else mixture
    if not isinstance(mixture, GaussianMixture) or mixture.dim != 2:
        raise ValueError("denoising_view needs a 2-D GaussianMixture (its noised density is exact)")
    (xlim, ylim) = window if window is not None else DEFAULT_WINDOWS["gmm40"]
    t = float(times[index])
    sigma = float(schedule.std(times[index : index + 1])[0])
    width = math.sqrt(mixture.std**2 + sigma**2)
    noised = GaussianMixture(name=f"{mixture.name} at t = {t:.3f}", dim=2, means=mixture.means, std=width)
    xs, ys, density = boltzmann_density_grid(noised, xlim, ylim, grid=grid)
    x = trajectory[index]
    covered, _ = mode_coverage(x, mixture.means.double(), width)
    return DenoisingView(index, t, sigma, x, xs, ys, density, covered, mixture.n_modes)


def draw_denoising_view(fig: Figure, view: DenoisingView, max_points: int = 2000) -> None:
    """The exact p_t as an image with the samples at t on top (white dots)."""
    ax = _density_image(fig, view.xs, view.ys, view.density, "exact $p_t(x)$")
    stride = max(1, math.ceil(view.samples.shape[0] / max_points))
    pts = view.samples[::stride].numpy()
    limits = ax.get_xlim(), ax.get_ylim()  # the image's extent; samples outside it are not shown
    ax.scatter(pts[:, 0], pts[:, 1], s=3, color="white", alpha=0.6, linewidths=0)
    ax.set(xlim=limits[0], ylim=limits[1], xlabel="$x_1$", ylabel="$x_2$")
    ax.set_title(view.title, fontsize="medium")


def reverse_sde_widget(trajectory: Tensor, times: Tensor, schedule: Any, mixture: GaussianMixture | None = None,
                       window: Window | None = None, grid: int = 120) -> SliderFigure:
    r"""Slide the reverse-SDE time t from 1 (the prior N(0, sigma_1^2 I)) to 0 and watch 2-D
    samples denoise onto a Gaussian mixture (default GMM-40).

    ``trajectory`` ``(n_steps + 1, B, 2)`` and ``times`` ``(n_steps + 1,)`` come from
    :func:`boltzlab.diffusion.reverse_sde_sample` with ``return_trajectory=True`` (times from 1
    down to 0). Each frame shows the states at t over the exact p_t, with the number of
    modes of p_t they cover in the title. ``widget.state`` is the :class:`DenoisingView`.
    """
    trajectory, times = _check_trajectory(trajectory, times)
    options = [(f"{float(t):.3f}", k) for k, t in enumerate(times)]

    def update(fig: Figure, t: int) -> DenoisingView:
        view = denoising_view(trajectory, times, schedule, t, mixture, window, grid)
        draw_denoising_view(fig, view)
        return view

    slider = ipywidgets.SelectionSlider(options=options, value=0, description="t", continuous_update=False)
    return slider_figure(update, figsize=(6.4, 5.0), t=slider)


__all__ += ["DenoisingView", "denoising_view", "draw_denoising_view", "reverse_sde_widget"]


# ----------------------------------------------------------------------------------------
# normalizing flows: through the coupling layers, and down an annealing ladder
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowStageView:
    """A 2-D flow after its first ``layers`` coupling layers (see :func:`flow_stage_views`)."""

    layers: int
    moved: tuple[int, ...]  # the coordinates (0-based) that coupling layer ``layers`` transforms
    xs: Tensor  # (grid,) cell centres in x1
    ys: Tensor  # (grid,) cell centres in x2
    density: Tensor  # (grid, grid) q(x) of the stage, density[j, i] at (xs[i], ys[j])
    mass: float  # the midpoint-rule integral of q over the mass window: 1 for a normalised density
    share_near_mode: float | None  # share of the stage's samples within the 99.9% radius of a mode
    modes_covered: int | None  # metrics.mode_coverage of those samples (None without a mixture)
    n_modes: int | None

    @property
    def title(self) -> str:
        if self.layers == 0:
            text = "0 coupling layers (the scaled base)"
        else:
            moved = ", ".join(f"$x_{i + 1}$" for i in self.moved)
            text = f"{self.layers} coupling layers: layer {self.layers} moves {moved} given the other"
        text += f"\n$\\int q$ = {self.mass:.4f}"
        if self.share_near_mode is not None:
            text += f", {100 * self.share_near_mode:.0f}% of samples near a mode ({self.modes_covered}/{self.n_modes})"
        return text


def flow_stage_views(flow: Any, window: Window, grid: int = 120, mixture: GaussianMixture | None = None,
                     n_samples: int = 10_000, mass_window: Window | None = None, mass_grid: int | None = None,
                     generator: torch.Generator | None = None, progress: bool = False) -> list[FlowStageView]:
    r"""One :class:`FlowStageView` per stage of :func:`boltzlab.flows.coupling_stages` of a 2-D ``flow``.

    Stage k is the flow made of the first k coupling layers and the final scaling, itself a
    normalised density. For each it records q on a ``grid × grid`` grid over ``window``, its
    integral ``Σ q ΔxΔy`` over ``mass_window`` (default ``window``; choose one wide enough for
    stage 0's Gaussian) on a ``mass_grid`` grid, and, given a Gaussian ``mixture``, the share of
    ``n_samples`` samples of the stage within a mode's 99.9% radius and the modes they cover
    (:func:`boltzlab.metrics.mode_coverage`). ``progress`` shows a bar over the stages.
    """
    from tqdm.auto import tqdm

    from boltzlab.flows import Flow, coupling_stages, log_prob_on_grid
    from boltzlab.metrics import mode_coverage

    if not isinstance(flow, Flow) or flow.dim != 2:
        raise ValueError("flow_stage_views needs a 2-D boltzlab.flows.Flow")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if mixture is not None and (not isinstance(mixture, GaussianMixture) or mixture.dim != 2):
        raise ValueError("mixture must be a 2-D GaussianMixture (its modes are counted)")
    mass_window = window if mass_window is None else mass_window
    layers = list(flow.layers)
    views = []
    stages = coupling_stages(flow)
    for k, stage in enumerate(tqdm(stages, desc="coupling stages", disable=not progress)):
        mask = getattr(layers[k - 1], "mask", None) if k > 0 else None
        moved = () if mask is None else tuple(int(i) for i in torch.nonzero(mask == 0).flatten())
        xs, ys, log_q = log_prob_on_grid(stage, *window, grid=grid)
        mx, my, mass_log_q = log_prob_on_grid(stage, *mass_window, grid=mass_grid or grid)
        mass = float(mass_log_q.exp().sum() * (mx[1] - mx[0]) * (my[1] - my[0]))
        share = covered = None
        if mixture is not None:
            # each stage draws from a generator at the same state, so the stages see the same base noise
            g = None if generator is None else torch.Generator().set_state(generator.get_state())
            with torch.no_grad():
                x = stage.sample(n_samples, generator=g)[0].double()
            covered, counts = mode_coverage(x, mixture.means.double(), mixture.std)
            share = float(counts.sum()) / n_samples
        views.append(FlowStageView(k, moved, xs, ys, log_q.exp(), mass, share, covered,
                                   None if mixture is None else mixture.n_modes))
    return views


def draw_flow_stage(fig: Figure, view: FlowStageView) -> None:
    """A :class:`FlowStageView` as an image of q with a colour bar."""
    ax = _density_image(fig, view.xs, view.ys, view.density, "q(x)")
    ax.set(xlabel="$x_1$", ylabel="$x_2$")
    ax.set_title(view.title, fontsize="medium")


def flow_layers_widget(views: Sequence[FlowStageView], value: int | None = None) -> SliderFigure:
    """Step through the coupling layers of a 2-D flow: ``views`` from :func:`flow_stage_views`
    (computed once, so the slider is instant). ``widget.state`` is the :class:`FlowStageView` shown."""
    views = list(views)
    if not views or not all(isinstance(v, FlowStageView) for v in views):
        raise ValueError("flow_layers_widget needs a non-empty list of FlowStageView (from flow_stage_views)")
    last = len(views) - 1
    value = last if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= last:
        raise ValueError(f"value must be an int in [0, {last}], got {value!r}")

    def update(fig: Figure, layers: int) -> FlowStageView:
        draw_flow_stage(fig, views[layers])
        return views[layers]

    slider = ipywidgets.IntSlider(value=value, min=0, max=last, description="layers", continuous_update=False)
    return slider_figure(update, figsize=(6.4, 5.2), layers=slider)


@dataclass(frozen=True)
class AnnealingRungView:
    """Rung ``rung`` of a temperature-annealing curriculum (see :func:`annealing_view`)."""

    rung: int
    kT: float
    ess_fraction: float  # Kish ESS / pool of the weights that fitted this rung; NaN for reverse KL
    samples: Tensor  # (n, 2) the flow's samples once the rung was fitted
    xs: Tensor
    ys: Tensor
    density: Tensor  # (grid, grid) exact p_kT on the window
    modes_covered: int | None
    n_modes: int | None

    @property
    def title(self) -> str:
        fit = "reverse KL" if math.isnan(self.ess_fraction) else f"pool ESS {self.ess_fraction:.2f}"
        text = f"rung {self.rung}: kT = {self.kT:.2f}, {fit}"
        if self.modes_covered is not None:
            text += f", {self.modes_covered}/{self.n_modes} modes"
        return text


def annealing_view(energy: Energy, stages: Sequence[Any], rung: int, window: Window, grid: int = 100) -> AnnealingRungView:
    r"""Rung ``rung`` of ``stages`` (the :class:`boltzlab.flows.AnnealingStage` list of
    :func:`boltzlab.flows.train_annealed`): the tempered target p_kT ∝ exp(−E/kT) of a 2-D
    ``energy`` on the window and the flow's samples at that rung; for a Gaussian mixture also the
    modes (of the kT = 1 target) the samples cover."""
    from boltzlab.metrics import mode_coverage

    if isinstance(rung, bool) or not isinstance(rung, int) or not 0 <= rung < len(stages):
        raise ValueError(f"rung must be an int in [0, {len(stages) - 1}], got {rung!r}")
    if energy.dim != 2:
        raise ValueError(f"annealing_view needs a 2-D energy, got dim {energy.dim}")
    stage = stages[rung]
    samples = stage.samples.detach().to("cpu", torch.float64)
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"stage samples must have shape (n, 2), got {tuple(samples.shape)}")
    xs, ys, density = boltzmann_density_grid(energy, *window, kT=float(stage.kT), grid=grid)
    covered = n_modes = None
    if isinstance(energy, GaussianMixture):
        covered = mode_coverage(samples, energy.means.double(), energy.std)[0]
        n_modes = energy.n_modes
    return AnnealingRungView(rung, float(stage.kT), float(stage.ess_fraction), samples, xs, ys, density,
                             covered, n_modes)


def annealing_widget(energy: Energy, stages: Sequence[Any], window: Window, grid: int = 100,
                     max_points: int = 2000) -> SliderFigure:
    """Step down an annealing ladder: each rung's tempered target with the flow's samples on top
    (orange). Starts at the last rung; ``widget.state`` is the :class:`AnnealingRungView` shown."""
    stages = list(stages)
    if not stages:
        raise ValueError("annealing_widget needs at least one stage (from boltzlab.flows.train_annealed)")

    def update(fig: Figure, rung: int) -> AnnealingRungView:
        view = annealing_view(energy, stages, rung, window, grid)
        ax = _density_image(fig, view.xs, view.ys, view.density, f"$p_{{kT}}(x)$, kT = {view.kT:.2f}")
        stride = max(1, math.ceil(view.samples.shape[0] / max_points))
        pts = view.samples[::stride].numpy()
        limits = ax.get_xlim(), ax.get_ylim()
        ax.scatter(pts[:, 0], pts[:, 1], s=2, color="orange", alpha=0.6, linewidths=0)
        ax.set(xlim=limits[0], ylim=limits[1], xlabel="$x_1$", ylabel="$x_2$")
        ax.set_title(view.title, fontsize="medium")
        return view

    slider = ipywidgets.IntSlider(value=len(stages) - 1, min=0, max=len(stages) - 1, description="rung",
                                  continuous_update=False)
    return slider_figure(update, figsize=(6.4, 5.6), rung=slider)


__all__ += ["FlowStageView", "flow_stage_views", "draw_flow_stage", "flow_layers_widget",
            "AnnealingRungView", "annealing_view", "annealing_widget"]


# ----------------------------------------------------------------------------------------
# diffusion from data: the noised density and its score as sigma varies (chapter 04)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoisedScoreView:
    """One frame of :func:`noised_score_widget` at noise level ``sigma``."""

    sigma: float
    xs: Tensor  # (grid,) cell centres in x1
    ys: Tensor  # (grid,) cell centres in x2
    density: Tensor  # (grid, grid) exact p_sigma on the window, density[j, i] at (xs[i], ys[j])
    points: Tensor  # (A, 2) where the arrows start (an arrows x arrows grid)
    exact_score: Tensor  # (A, 2) exact ∇ log p_sigma at the points
    model_score: Tensor | None  # (A, 2) the learned score at the same points, or None
    relative_error: float | None  # sum_a p(a) |s - s*|^2 / sum_a p(a) |s*|^2 over the points

    @property
    def title(self) -> str:
        text = f"$\\sigma$ = {self.sigma:.3g}"
        if self.relative_error is not None:
            text += f": learned score's relative error {self.relative_error:.3f}"
        return text


def noised_score_view(mixture: GaussianMixture, sigma: float, score: Callable[[Tensor, Tensor], Tensor] | None = None,
                      schedule: Any = None, window: Window | None = None, grid: int = 100,
                      arrows: int = 15) -> NoisedScoreView:
    r"""The exact p_sigma = p * N(0, sigma^2 I) of a 2-D ``mixture`` on a ``grid`` x ``grid`` window,
    and its exact score on an ``arrows`` x ``arrows`` grid; with ``score`` (a model s(x, t)) and its
    ``schedule`` (a :class:`boltzlab.diffusion.GeometricNoiseSchedule`), also the model's score at
    t = schedule.time_at_std(sigma) and its density-weighted relative squared error there."""
    from boltzlab.estimators import gmm_noised_score, noised_mixture

    if not isinstance(mixture, GaussianMixture) or mixture.dim != 2:
        raise ValueError("noised_score_view needs a 2-D GaussianMixture (its noised density is exact)")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma}")
    if score is not None and schedule is None:
        raise ValueError("a score model needs its schedule, to turn sigma into the time t it was trained at")
    for name, value in (("grid", grid), ("arrows", arrows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    (xlim, ylim) = window if window is not None else DEFAULT_WINDOWS["gmm40"]
    noised = noised_mixture(mixture, sigma)
    xs, ys, density = boltzmann_density_grid(noised, xlim, ylim, grid=grid)
    ax_ = torch.linspace(xlim[0], xlim[1], arrows + 2, dtype=torch.float64)[1:-1]
    ay_ = torch.linspace(ylim[0], ylim[1], arrows + 2, dtype=torch.float64)[1:-1]
    gx, gy = torch.meshgrid(ax_, ay_, indexing="xy")
    points = torch.stack([gx.flatten(), gy.flatten()], dim=-1)
    exact = gmm_noised_score(mixture, points, float(sigma))
    model_score, rel = None, None
    if score is not None:
        dtype = next(iter(score.parameters())).dtype if isinstance(score, torch.nn.Module) else torch.float32
        t = schedule.time_at_std(torch.full((points.shape[0],), float(sigma), dtype=torch.float64))
        with torch.no_grad():
            model_score = score(points.to(dtype), t.to(dtype)).detach().to(torch.float64)
        if model_score.shape != points.shape:
            raise ValueError(f"score(x, t) returned shape {tuple(model_score.shape)}, expected {tuple(points.shape)}")
        weight = noised.log_prob(points).exp()
        rel = float((weight * (model_score - exact).pow(2).sum(-1)).sum() / (weight * exact.pow(2).sum(-1)).sum())
    return NoisedScoreView(float(sigma), xs, ys, density, points, exact, model_score, rel)


def draw_noised_score_view(fig: Figure, view: NoisedScoreView) -> None:
    """The exact p_sigma as an image, exact score arrows in white and the model's in red. Arrows
    are drawn as directions with length growing like |s|^(1/2), so that both the steep score near
    the modes and the weak pull far from them stay visible."""
    ax = _density_image(fig, view.xs, view.ys, view.density, "exact $p_\\sigma(x)$")
    limits = ax.get_xlim(), ax.get_ylim()

    def shown(s: Tensor) -> np.ndarray:
        norm = s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return (s / norm * norm.sqrt()).numpy()

    pts = view.points.numpy()
    scale = float(view.exact_score.norm(dim=-1).sqrt().max()) * 15 / 1.2  # longest arrow ~1.2 arrow spacings
    ax.quiver(pts[:, 0], pts[:, 1], *shown(view.exact_score).T, color="white", scale=scale, width=0.004,
              label="exact score")
    if view.model_score is not None:
        ax.quiver(pts[:, 0], pts[:, 1], *shown(view.model_score).T, color="tab:red", scale=scale, width=0.004,
                  alpha=0.8, label="learned score")
        ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
    ax.set(xlim=limits[0], ylim=limits[1], xlabel="$x_1$", ylabel="$x_2$")
    ax.set_title(view.title, fontsize="medium")


def noised_score_widget(mixture: GaussianMixture | None = None, score: Callable[[Tensor, Tensor], Tensor] | None = None,
                        schedule: Any = None, sigma_range: tuple[float, float] = (0.1, 100.0), sigma: float = 1.0,
                        window: Window | None = None, grid: int = 100, arrows: int = 15) -> SliderFigure:
    r"""Slide sigma over decades (log slider) and watch the noised density p_sigma = p * N(0, sigma^2 I)
    of a 2-D Gaussian mixture (default GMM-40) merge its modes, with the exact score field on top
    and, if ``score`` and its ``schedule`` are given, a learned score's arrows and its
    density-weighted relative error in the title. ``widget.state`` is the :class:`NoisedScoreView`.
    """
    mixture = GaussianMixture() if mixture is None else mixture
    lo, hi = sigma_range
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"sigma_range must be two positive numbers lo < hi, got {sigma_range}")
    if not lo <= sigma <= hi:
        raise ValueError(f"sigma = {sigma} is outside sigma_range {sigma_range}")
    noised_score_view(mixture, sigma, score, schedule, window, 2, 2)  # validates the arguments once, cheaply

    def update(fig: Figure, sigma: float) -> NoisedScoreView:
        view = noised_score_view(mixture, sigma, score, schedule, window, grid, arrows)
        draw_noised_score_view(fig, view)
        return view

    slider = ipywidgets.FloatLogSlider(value=sigma, base=10, min=math.log10(lo), max=math.log10(hi), step=0.05,
                                       description="σ", continuous_update=False, readout_format=".3g")
    return slider_figure(update, figsize=(6.4, 5.0), sigma=slider)


__all__ += ["NoisedScoreView", "noised_score_view", "draw_noised_score_view", "noised_score_widget"]
