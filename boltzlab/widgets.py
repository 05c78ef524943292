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

Widgets here:

- :func:`temperature_widget`: p_T(x) ∝ exp(-E(x)/kT) of a 2-D energy for a kT slider,
  with the exact probability of the double well's deep well in the title.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import ipywidgets
from matplotlib.figure import Figure
from torch import Tensor

from boltzlab.energies import DoubleWell2D, Energy, GaussianMixture
from boltzlab.plots import boltzmann_density_grid

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


def figure_to_png(fig: Figure, dpi: int = 80) -> bytes:
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
        figsize: tuple[float, float] = (6.0, 4.5),
        dpi: int = 80,
    ) -> None:
        image = ipywidgets.Image(format="png")
        super().__init__(children=[ipywidgets.HBox(list(controls.values())), image])
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
        fig = Figure(figsize=self.figsize, layout="constrained")
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
    figsize: tuple[float, float] = (6.0, 4.5),
    dpi: int = 80,
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


def draw_temperature_view(fig: Figure, view: TemperatureView) -> None:
    """Draw a :class:`TemperatureView` as an image with a colour bar into ``fig``."""
    ax = fig.add_subplot()
    half_dx = 0.5 * float(view.xs[1] - view.xs[0])
    half_dy = 0.5 * float(view.ys[1] - view.ys[0])
    extent = (float(view.xs[0]) - half_dx, float(view.xs[-1]) + half_dx,
              float(view.ys[0]) - half_dy, float(view.ys[-1]) + half_dy)
    image = ax.imshow(view.density.numpy(), origin="lower", extent=extent, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="$p_T(x)$")
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
    return slider_figure(update, figsize=(6.0, 4.5), energy=energy_menu, kT=kT_slider)
