"""Tests of boltzlab.plots: the right artists, legend numbers equal to the metrics, normalised densities."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402

from boltzlab import metrics as M  # noqa: E402
from boltzlab import plots as P  # noqa: E402
from boltzlab.energies import DoubleWell2D, GaussianMixture, ManyWell, dw4  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error")


@pytest.fixture(autouse=True)
def no_show_and_close(monkeypatch):
    def refuse_show(*args, **kwargs):
        raise AssertionError("plots must never call plt.show()")

    monkeypatch.setattr(plt, "show", refuse_show)
    yield
    plt.close("all")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# ----------------------------------------------------------------------------- energy histograms


def test_energy_histogram_draws_one_patch_per_set_and_legends_the_real_w2():
    ref = torch.randn(4000, generator=gen(0))
    samplers = {"good": torch.randn(2000, generator=gen(1)), "wide": 1.5 * torch.randn(1000, generator=gen(2)) + 0.5}
    ax = P.energy_histogram(samplers, reference=ref, bins=40)
    assert len(ax.patches) == 3 and all(isinstance(p, StepPatch) for p in ax.patches)
    labels = legend_texts(ax)
    assert labels[0] == "reference"
    for label, (name, e) in zip(labels[1:], samplers.items()):
        assert label.startswith(name)
        assert f"W2 = {M.energy_w2(e, ref):.3g}" in label
    # the W2 of a good sampler is much smaller than that of the wide one
    assert M.energy_w2(samplers["good"], ref) < 0.3 * M.energy_w2(samplers["wide"], ref)


def test_energy_histogram_heights_are_densities_of_the_data():
    ref = torch.rand(5000, generator=gen(3)) * 2.0  # uniform on [0, 2): density 0.5
    ax = P.energy_histogram({}, reference=ref, bins=10, range=(0.0, 2.0))
    data = ax.patches[0].get_data()
    heights, edges = data.values, data.edges
    np.testing.assert_allclose(edges, np.linspace(0.0, 2.0, 11))
    assert float(np.sum(heights * np.diff(edges))) == pytest.approx(1.0)
    np.testing.assert_allclose(heights, 0.5, atol=0.08)


def test_energy_histogram_reports_dropped_and_outside_values():
    ref = torch.randn(1000, generator=gen(4))
    e = torch.randn(500, generator=gen(5))
    e[:3] = float("nan")
    e[3:53] = 100.0  # far outside the reference's range: 50 of 497 finite values
    ax = P.energy_histogram({"diverging": e}, reference=ref, bins=20)
    label = legend_texts(ax)[1]
    finite = e[torch.isfinite(e)]
    assert f"W2 = {M.energy_w2(finite, ref):.3g}" in label
    assert "3 non-finite dropped" in label
    assert f"{100 * 50 / 497:.1f}% outside the range" in label
    # the reference keeps its window (a diverged tail must not squash it), and the 10% far
    # away is drawn as a hatched bar beyond the right edge whose area is that fraction
    edges = ax.patches[1].get_data().edges
    assert edges[-1] < 10
    bars = [p for p in ax.patches if p.get_hatch()]
    assert len(bars) == 1 and bars[0].get_x() > edges[-1]
    assert bars[0].get_width() * bars[0].get_height() == pytest.approx(50 / 497)


def test_energy_histogram_range_covers_a_sampler_beside_the_reference():
    """A sampler whose energies all lie beyond the reference's window is drawn, not lost:
    the range widens to cover both, and every value falls in a bin."""
    ref = torch.randn(2000, generator=gen(7))
    shifted = torch.randn(2000, generator=gen(8)) + 12.0
    ax = P.energy_histogram({"shifted": shifted}, reference=ref, bins=50)
    data = ax.patches[1].get_data()
    assert data.edges[0] < float(ref.min()) + 1.0 and data.edges[-1] > float(shifted.quantile(0.99))
    assert float(np.sum(data.values * np.diff(data.edges))) == pytest.approx(1.0, abs=0.003)
    # at most the sampler's own 0.1% tails are left for the edge bars
    assert sum(p.get_width() * p.get_height() for p in ax.patches if p.get_hatch()) < 0.003


def test_distance_histogram_draws_the_mass_outside_as_edge_bars():
    energy = dw4()
    ref = energy.remove_com(torch.randn(500, 8, generator=gen(9)) * 1.5)
    exploded = ref * 100.0  # every distance far beyond the reference's
    ax = P.distance_histogram_plot({"exploded": exploded}, 4, 2, reference=ref, bins=30)
    bars = [p for p in ax.patches if p.get_hatch()]
    assert len(bars) == 1 and bars[0].get_width() * bars[0].get_height() == pytest.approx(1.0, abs=0.01)
    assert "% outside the range" in legend_texts(ax)[1]


def test_energy_histogram_without_reference_and_on_given_axes():
    fig, ax = plt.subplots()
    n_figs = len(plt.get_fignums())
    out = P.energy_histogram({"a": torch.randn(100, generator=gen(6))}, ax=ax)
    assert out is ax and len(plt.get_fignums()) == n_figs
    assert legend_texts(ax) == ["a\nn = 100"]
    with pytest.raises(ValueError, match="nothing to plot"):
        P.energy_histogram({})


# ----------------------------------------------------------------------------- distance histograms


def test_distance_histogram_plot_legends_the_real_w2_and_tvd():
    target = dw4()
    ref = target.remove_com(2.0 * torch.randn(500, 8, generator=gen(7)))
    x = target.remove_com(2.5 * torch.randn(300, 8, generator=gen(8)))
    bins, rng = 30, (0.0, 8.0)
    ax = P.distance_histogram_plot({"sampler": x}, 4, 2, reference=ref, bins=bins, range=rng)
    assert len([p for p in ax.patches if isinstance(p, StepPatch)]) == 2
    label = legend_texts(ax)[1]
    assert f"W2 = {M.distance_w2(x, ref, 4, 2):.3g}" in label
    assert f"TVD = {M.distance_tvd(x, ref, 4, 2, bins=bins, range=rng):.3g}" in label
    heights = ax.patches[0].get_data().values
    expected = M.distance_histogram(ref, bins=bins, range=rng, n_particles=4, spatial_dim=2)
    np.testing.assert_allclose(heights, expected.density.numpy())


# ----------------------------------------------------------------------------- 2-D densities


def test_density_image_is_normalised_and_covers_the_window():
    xlim, ylim, grid = (-3.0, 3.0), (-5.0, 5.0), 120
    ax = P.density_2d(DoubleWell2D(), xlim, ylim, grid=grid)
    image = ax.images[0]
    p = np.asarray(image.get_array())
    cell_area = (6.0 / grid) * (10.0 / grid)
    assert p.shape == (grid, grid)
    assert float(p.sum()) * cell_area == pytest.approx(1.0, abs=1e-9)
    assert tuple(image.get_extent()) == (*xlim, *ylim)


@pytest.mark.parametrize("kT", [1.0, 2.5])
def test_density_grid_matches_the_exact_double_well_density(kT):
    # the window holds all but ~1e-6 of the mass, so the grid normaliser is the exact Z
    target = DoubleWell2D(kT=kT)
    xs, ys, p = P.boltzmann_density_grid(target, (-4.0, 4.0), (-8.0, 8.0), grid=300)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    exact = torch.exp(target.log_prob(torch.stack([xx, yy], -1)) - target.log_z())
    torch.testing.assert_close(p, exact, rtol=2e-4, atol=0.0)


def test_density_grid_matches_the_normalised_gmm40_density():
    # GMM-40's energy is -log p with log Z = 0 at kT = 1
    target = GaussianMixture()
    xs, ys, p = P.boltzmann_density_grid(target, (-50.0, 50.0), (-50.0, 50.0), grid=250)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    exact = torch.exp(-target.energy(torch.stack([xx, yy], -1)))
    torch.testing.assert_close(p, exact, rtol=1e-6, atol=1e-12)


def test_density_contour_and_bad_input():
    ax = P.density_2d(GaussianMixture(), (-50, 50), (-50, 50), grid=60, kind="contour", colorbar=False)
    assert len(ax.collections) >= 1 and not ax.images
    assert ax.get_title() == "gmm40, kT = 1"
    with pytest.raises(ValueError, match="2-D energy"):
        P.density_2d(ManyWell(), (-1, 1), (-1, 1))
    with pytest.raises(ValueError, match="kind"):
        P.density_2d(DoubleWell2D(), (-1, 1), (-1, 1), kind="surface")


def test_samples_2d_overlays_strided_points():
    x = torch.randn(1000, 2, generator=gen(9))
    ax = P.density_2d(DoubleWell2D(), (-3, 3), (-5, 5), grid=40)
    P.samples_2d(x, ax=ax, max_points=300)
    offsets = ax.collections[-1].get_offsets()
    np.testing.assert_allclose(np.asarray(offsets), x[::4].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        P.samples_2d(torch.zeros(10, 3))


# ----------------------------------------------------------------------------- traces and curves


def test_trace_plot_from_tensor_and_dict():
    traces = torch.randn(50, 20, generator=gen(10))
    ax = P.trace_plot(traces, max_chains=5, thin=10)
    assert len(ax.lines) == 5
    np.testing.assert_allclose(ax.lines[2].get_xdata(), np.arange(50) * 10)
    np.testing.assert_allclose(ax.lines[2].get_ydata(), traces[:, 2].numpy(), rtol=1e-6)
    ax = P.trace_plot({"MALA": torch.zeros(10), "PT": torch.ones(10), "MH": torch.ones(10)})
    assert len(ax.lines) == 3 and legend_texts(ax) == ["MALA", "PT", "MH"]
    assert len(P.trace_plot(torch.zeros(7)).lines) == 1
    with pytest.raises(ValueError, match="n_steps"):
        P.trace_plot(torch.zeros(2, 3, 4))


def test_training_curve_smoothing_and_log_scale():
    values = [1.0, 3.0, 2.0, 4.0, 6.0, 5.0]
    ax = P.training_curve(values, smooth=3, logy=True)
    assert len(ax.lines) == 2 and ax.get_yscale() == "log"
    raw, mean = ax.lines
    np.testing.assert_allclose(raw.get_ydata(), values)
    np.testing.assert_allclose(mean.get_xdata(), [2, 3, 4, 5])
    np.testing.assert_allclose(mean.get_ydata(), [2.0, 3.0, 4.0, 5.0])
    ax = P.training_curve({"ML": torch.linspace(1, 0, 20), "KL": torch.linspace(2, 1, 20)})
    assert len(ax.lines) == 2 and legend_texts(ax) == ["ML", "KL"]
    with pytest.raises(ValueError, match="values <= 0"):
        P.training_curve([1.0, -1.0], logy=True)
    with pytest.raises(ValueError, match="no values"):
        P.training_curve([])


def test_figures_render_without_warnings(tmp_path):
    ax = P.density_2d(DoubleWell2D(kT=2.0), (-3, 3), (-5, 5), grid=50)
    P.samples_2d(torch.randn(100, 2, generator=gen(11)), ax=ax, label="samples")
    ax.figure.savefig(tmp_path / "density.png")
    assert (tmp_path / "density.png").stat().st_size > 1000
    assert math.isfinite(float(np.asarray(ax.images[0].get_array()).max()))


# ----------------------------------------------------------------------------- figure layout


@pytest.mark.parametrize("n, ncols", [(1, 1), (2, 2), (4, 2), (5, 2)])
def test_panel_grid_wraps_into_rows_that_fit_the_column(n, ncols):
    fig, axes = P.panel_grid(n)
    assert len(axes) == n and len(fig.axes) == n
    assert fig.get_figwidth() <= P.COLUMN_WIDTH_IN
    columns = {round(ax.get_position().x0, 3) for ax in axes}
    assert len(columns) == ncols
    for ax in axes:
        ax.plot([0, 1], [0, 1], label="a curve")
        ax.set(xlabel="energy evaluations", ylabel="energy W2", title="a title")
        ax.legend(fontsize="small")
    assert P.smallest_text_px(fig) >= 10.0


def test_panel_grid_shrinks_panels_to_fit_a_forced_number_of_columns():
    fig, axes = P.panel_grid(6, panel_size=(4.0, 3.0), ncols=3)
    assert fig.get_figwidth() == pytest.approx(P.COLUMN_WIDTH_IN)
    assert fig.get_figheight() == pytest.approx(2 * 3.0 * P.COLUMN_WIDTH_IN / 12.0)
    with pytest.raises(ValueError, match="n_panels"):
        P.panel_grid(0)


def test_smallest_text_px_counts_the_shrink_of_a_figure_wider_than_the_column():
    fig, ax = plt.subplots(figsize=(19.0, 3.8), dpi=100)  # chapter 06's old four-panel figure
    ax.set_xlabel("energy evaluations")  # 10 pt = 13.9 px at 100 dpi, shrunk by 968/1900
    assert P.smallest_text_px(fig) == pytest.approx(10 * 100 / 72 * P.COLUMN_PX / 1900)
    assert P.smallest_text_px(fig) < 10


def test_axis_labels_are_human():
    assert P.axis_label("energy_w2") == "energy W2"
    assert P.axis_label("modes_covered") == "modes covered"
    assert P.axis_label("some_new_metric") == "some new metric"


# ----------------------------------------------------------------------------- evaluation curves


def test_evaluation_curves_draw_each_metric_against_the_budget_with_baseline_and_target(tmp_path):
    records = [{"energy_evaluations": 1e5 * 10**k, "energy_w2": 3.0 / (k + 1), "x_w2": 9.0 - k} for k in range(4)]
    mcmc = {"energy_evaluations": 1e8, "energy_w2": 0.7, "acceptance": 0.5}
    axes = P.evaluation_curves(records, ["energy_w2", "x_w2"], baseline=mcmc, targets={"x_w2": 6.0})
    assert len(axes) == 2 and all(ax.get_xscale() == "log" for ax in axes)
    curve, star = axes[0].lines
    np.testing.assert_allclose(curve.get_xdata(), [1e5, 1e6, 1e7, 1e8])
    np.testing.assert_allclose(curve.get_ydata(), [3.0, 1.5, 1.0, 0.75])
    assert list(star.get_xdata()) == [1e8] and list(star.get_ydata()) == [0.7]
    # the baseline has no x_w2: that panel gets the curve and the target line only
    lines = axes[1].lines
    np.testing.assert_allclose(lines[0].get_ydata(), [9.0, 8.0, 7.0, 6.0])
    assert len(lines) == 2 and list(lines[1].get_ydata()) == [6.0, 6.0]
    assert legend_texts(axes[1]) == ["iDEM", "target 6"]
    assert [ax.get_ylabel() for ax in axes] == ["energy W2", "x-W2"]
    assert axes[0].get_xlabel() == "energy evaluations"
    axes[0].figure.savefig(tmp_path / "curves.png")


def test_evaluation_curves_with_one_point_get_a_linear_axis_with_readable_ticks(tmp_path):
    """One evaluation on a log axis labels minor ticks that overlap (chapter 06's LJ-55)."""
    records = [{"energy_evaluations": 3.2e9, "energy_w2": 4.0}]
    axes = P.evaluation_curves(records, ["energy_w2"], baseline={"energy_evaluations": 3.2e9, "energy_w2": 9.0},
                               logy=["energy_w2"])
    ax = axes[0]
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "linear"  # 4 to 9: less than a decade
    lo, hi = ax.get_xlim()
    assert lo < 3.2e9 < hi
    ax.figure.savefig(tmp_path / "one.png")  # draws the ticks
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert 2 <= len(ticks) <= 6
    boxes = sorted((t.get_window_extent().x0, t.get_window_extent().x1) for t in ticks)
    assert all(a[1] <= b[0] for a, b in zip(boxes, boxes[1:])), "tick labels overlap"
    # over more than a decade the log axis stays
    spread = [{"energy_evaluations": 1e5, "energy_w2": 30.0}, {"energy_evaluations": 1e7, "energy_w2": 0.5}]
    ax = P.evaluation_curves(spread, ["energy_w2"], logy=["energy_w2"])[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_ablation_chart_draws_one_bar_per_variant_with_the_base_and_targets(tmp_path):
    records = [{"variant": "base", "distance_w2": 0.05, "energy_w2": 20.0},
               {"variant": "k128", "distance_w2": 0.5, "energy_w2": 30.0},
               {"variant": "blended", "distance_w2": 0.04, "energy_w2": 10.0}]
    axes = P.ablation_chart(records, ["distance_w2", "energy_w2"], targets={"distance_w2": 0.03})
    bars = [p.get_width() for p in axes[0].patches]
    np.testing.assert_allclose(bars, [0.05, 0.5, 0.04])
    # the base is drawn first at the top; its value and the target are the vertical lines
    assert [float(line.get_xdata()[0]) for line in axes[0].lines] == [0.05, 0.03]
    assert axes[0].get_xscale() == "log" and axes[1].get_xscale() == "linear"  # 10 to 30: under a decade
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["base", "k128", "blended"]
    assert [ax.get_xlabel() for ax in axes] == ["distance W2", "energy W2"]
    axes[0].figure.savefig(tmp_path / "ablation.png")
    with pytest.raises(ValueError, match="'k128' has no 'x_w2'"):
        P.ablation_chart([{"variant": "k128", "distance_w2": 1.0}], ["distance_w2", "x_w2"])
    with pytest.raises(ValueError, match="no records"):
        P.ablation_chart([])


def test_evaluation_curves_on_given_axes_and_bad_input():
    _, (a, b) = plt.subplots(1, 2)
    records = [{"outer": 0.0, "loss": 2.0}, {"outer": 1.0, "loss": 1.0}]
    axes = P.evaluation_curves(records, ["loss"], x_key="outer", axes=[a])
    assert axes == [a] and a.get_xscale() == "linear"  # a zero on the x axis: no log scale
    with pytest.raises(ValueError, match="no evaluations"):
        P.evaluation_curves([], ["loss"])
    with pytest.raises(ValueError, match="evaluation 1 has no 'energy_w2'"):
        P.evaluation_curves([{"energy_evaluations": 1, "energy_w2": 1.0}, {"energy_evaluations": 2}], ["energy_w2"])
    with pytest.raises(ValueError, match="2 axes given for 1 metrics"):
        P.evaluation_curves(records, ["loss"], x_key="outer", axes=[a, b])
    with pytest.raises(ValueError, match="baseline has no 'outer'"):
        P.evaluation_curves(records, ["loss"], x_key="outer", baseline={"loss": 1.0})


# ----------------------------------------------------------------------------- reward vs KL


def test_reward_kl_tradeoff_draws_methods_frontier_and_optimum(tmp_path):
    frontier = ([0.0, 0.2, 0.7], [4.0, 5.5, 6.4])
    ax = P.reward_kl_tradeoff({"distillation": ([0.1, 0.3, 0.68], [5.2, 5.9, 6.38]), "best-of-N": ([0.0, 0.19], [4.0, 5.6])},
                              frontier=frontier, optimum=(0.69, 6.41))
    dashed, distill, bon, star = ax.lines
    np.testing.assert_allclose(dashed.get_xdata(), frontier[0])
    np.testing.assert_allclose(distill.get_ydata(), [5.2, 5.9, 6.38])
    np.testing.assert_allclose(bon.get_xdata(), [0.0, 0.19])
    assert list(star.get_xdata()) == [0.69] and list(star.get_ydata()) == [6.41]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts[1:3] == ["distillation", "best-of-N"] and "optimum" in texts[-1]
    ax.figure.savefig(tmp_path / "tradeoff.png")


def test_reward_kl_tradeoff_bad_input():
    with pytest.raises(ValueError, match="no methods"):
        P.reward_kl_tradeoff({})
    with pytest.raises(ValueError, match="'rwr' has 2 KL values and 1 rewards"):
        P.reward_kl_tradeoff({"rwr": ([0.1, 0.2], [1.0])})
    with pytest.raises(ValueError, match="frontier has 2 KL values and 3 rewards"):
        P.reward_kl_tradeoff({"rwr": ([0.1], [1.0])}, frontier=([0.0, 1.0], [1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------- seeds of fine-tuning runs


def test_seed_curves_draws_every_seed_and_the_final_spread(tmp_path):
    lines = [([0.0, 0.1, 0.2], [1.0, 1.5, 1.8]), ([0.0, 0.12, 0.25], [1.0, 1.4, 1.9])]
    ax = P.seed_curves({"vidd": (lines, (0.22, 0.03, 1.85, 0.05)), "pg": ([([0.0, 0.3], [1.0, 1.6])], (0.3, 0.0, 1.6, 0.0))},
                       optimum=(0.3, 2.0))
    thin = [ln for ln in ax.lines if ln.get_linestyle() == "-" and ln.get_alpha() == 0.35]
    assert len(thin) == 3  # one line per seed
    np.testing.assert_allclose(thin[1].get_ydata(), [1.0, 1.4, 1.9])
    assert thin[0].get_color() == thin[1].get_color() != thin[2].get_color()  # a colour per method
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(texts) == ["optimum (importance sampled)", "pg", "vidd"]
    bars = [c for c in ax.containers]  # errorbar containers, one per method
    assert len(bars) == 2
    np.testing.assert_allclose(np.asarray(bars[0].lines[0].get_xdata(), dtype=float), [0.22])
    ax.figure.savefig(tmp_path / "seeds.png")


def test_seed_curves_fixed_colours_and_no_legend():
    lines = [([0.0, 0.1], [1.0, 1.5])]
    ax = P.seed_curves({"a": (lines, (0.1, 0.0, 1.5, 0.0)), "b": (lines, (0.1, 0.0, 1.5, 0.0))},
                       colors={"a": "#ff0000", "b": "#00ff00"}, legend=False)
    assert ax.get_legend() is None
    assert [ln.get_color() for ln in ax.lines if ln.get_alpha() == 0.35] == ["#ff0000", "#00ff00"]


def test_seed_curves_bad_input():
    with pytest.raises(ValueError, match="no methods"):
        P.seed_curves({})
    with pytest.raises(ValueError, match="'pg' seed 0 has 2 KL values and 1 rewards"):
        P.seed_curves({"pg": ([([0.0, 0.1], [1.0])], (0.1, 0.0, 1.0, 0.0))})
    with pytest.raises(ValueError, match=r"final must be \(kl, kl_sd, reward, reward_sd\)"):
        P.seed_curves({"pg": ([([0.0], [1.0])], (0.1, 1.0))})


def test_seed_strip_marks_means_and_diverged_seeds(tmp_path):
    ax = P.seed_strip({"a": [0.1, 0.2, 0.3], "b": [0.05, float("nan"), 0.07]}, reference=0.0)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["a", "b (1 diverged)"]
    dots_a = ax.lines[0]
    np.testing.assert_allclose(dots_a.get_xdata(), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [0.2, 0.2])  # the mean bar of row a
    crosses = [ln for ln in ax.lines if ln.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [0.3]  # at the right edge
    with pytest.raises(ValueError, match="nothing to plot"):
        P.seed_strip({})
    with pytest.raises(ValueError, match="'c' has no values"):
        P.seed_strip({"c": []})
    ax.figure.savefig(tmp_path / "strip.png")


def test_quantile_band_chart_draws_each_band_of_each_sampler_and_legends_w2(tmp_path):
    from boltzlab import metrics

    a = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bands = {"shifted": metrics.wasserstein_1d_by_quantile(a + 0.1, a),
             "tail": metrics.wasserstein_1d_by_quantile(torch.cat([a[:-3], a[-3:] + 5]), a)}
    ax = P.quantile_band_chart(bands)
    heights = [p.get_height() for p in ax.patches]
    expected = [b.wp_p for sampler in bands.values() for b in sampler]
    np.testing.assert_allclose(heights, expected)
    assert [t.get_text() for t in ax.get_xticklabels()][-2:] == ["99-99.9%", "99.9-100%"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == f"shifted (W2 {metrics.wasserstein_1d(a + 0.1, a):.3g})"
    assert ax.get_yscale() == "log"
    ax.figure.savefig(tmp_path / "bands.png")
    with pytest.raises(ValueError, match="different edges"):
        P.quantile_band_chart({"a": bands["shifted"], "b": metrics.wasserstein_1d_by_quantile(a, a, edges=(0.0, 1.0))})
    with pytest.raises(ValueError, match="nothing to plot"):
        P.quantile_band_chart({})


def test_virial_chart_draws_one_line_per_score_and_the_exact_value(tmp_path):
    rows = [{"sigma": 0.5, "exact": -36.0, "network": -41.0, "target_1000": -43.6},
            {"sigma": 0.1, "exact": -36.0, "network": 13.4, "target_1000": 17.9}]
    ax = P.virial_chart(rows, ["network", "target_1000"], labels={"network": "the network"})
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["the network", "target_1000", "exact (Stein's identity)"]
    np.testing.assert_allclose(lines[0].get_xdata(), [0.1, 0.5])  # sorted by sigma
    np.testing.assert_allclose(lines[0].get_ydata(), [13.4, -41.0])
    np.testing.assert_allclose(lines[2].get_ydata(), [-36.0, -36.0])
    assert ax.get_xscale() == "log"
    ax.figure.savefig(tmp_path / "virial.png")
    with pytest.raises(ValueError, match="rows lack target_4000"):
        P.virial_chart(rows, ["target_4000"])
    with pytest.raises(ValueError, match="nothing to plot"):
        P.virial_chart([], ["network"])
