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
:func:`ablation_chart`         one metric per ablation variant, against the base recipe
:func:`seed_curves`            a logged metric of several seeds of one recipe
:func:`seed_strip`             final metrics of several seeds, one dot each
:func:`quantile_band_chart`    what each band of quantile levels adds to W2^2
:func:`virial_chart`           a score's mean virial per noise level against Stein's exact value
:func:`panel_grid`             a figure of several panels that wraps into rows to fit the
                               notebook column (text stays readable, never shrunk)
:func:`axis_label`             the human label of a metric's key (``energy_w2`` -> energy W2)
=============================  =============================================================

The package is split by what a figure compares: :mod:`~boltzlab.plots.distributions`
(histograms and densities), :mod:`~boltzlab.plots.curves` (anything over time or budget),
:mod:`~boltzlab.plots.comparisons` (samplers, seeds, variants side by side), and the shared
sizing rules in :mod:`~boltzlab.plots._layout`. Import from :mod:`boltzlab.plots` itself.

Figures are sized for JupyterLab's notebook column: the inline backend draws at
``FIGURE_DPI`` and shows an image at its own pixel size unless it is wider than the column
(``COLUMN_PX``, measured in a 1400x1000 window), where it is shrunk and its text with it.
So no figure here is wider than ``COLUMN_WIDTH_IN`` inches; multi-panel figures wrap.
"""


from boltzlab.plots._layout import (
    AXIS_LABELS,
    COLUMN_PX,
    COLUMN_WIDTH_IN,
    FIGURE_DPI,
    REFERENCE_STYLE,
    axis_label,
    panel_grid,
    smallest_text_px,
)
from boltzlab.plots.comparisons import (
    ablation_chart,
    quantile_band_chart,
    seed_curves,
    seed_strip,
    virial_chart,
)
from boltzlab.plots.curves import (
    evaluation_curves,
    reward_kl_tradeoff,
    trace_plot,
    training_curve,
)
from boltzlab.plots.distributions import (
    MAX_STRETCH,
    boltzmann_density_grid,
    density_2d,
    distance_histogram_plot,
    energy_histogram,
    samples_2d,
)

__all__ = [
    "AXIS_LABELS", "COLUMN_PX", "COLUMN_WIDTH_IN", "FIGURE_DPI", "MAX_STRETCH", "REFERENCE_STYLE",
    "ablation_chart", "axis_label", "boltzmann_density_grid", "density_2d", "distance_histogram_plot",
    "energy_histogram", "evaluation_curves", "panel_grid", "quantile_band_chart", "reward_kl_tradeoff",
    "samples_2d", "seed_curves", "seed_strip", "smallest_text_px", "trace_plot", "training_curve",
    "virial_chart",
]
