"""Tests of boltzlab.widgets without a browser: build, move a control, read the PNG and the state."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from boltzlab import widgets as W  # noqa: E402
from boltzlab.energies import DoubleWell2D, GaussianMixture, ManyWell, MullerBrown  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_slider_figure_redraws_on_every_change():
    calls = []

    def draw(fig, a, b):
        calls.append((a, b))
        fig.add_subplot().plot([0, 1], [0, a * b])
        return a * b

    widget = W.slider_figure(draw, a=ipywidgets.FloatSlider(value=1.0), b=ipywidgets.IntSlider(value=2))
    assert isinstance(widget, ipywidgets.VBox)
    assert calls == [(1.0, 2)] and widget.state == 2.0
    first = bytes(widget.image.value)
    assert first.startswith(PNG_SIGNATURE)
    widget.controls["b"].value = 5
    assert calls[-1] == (1.0, 5) and widget.state == 5.0
    assert bytes(widget.image.value) != first


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (bytes 16-24)."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def test_slider_figure_shows_its_png_at_its_own_pixel_size():
    """The image widget is pinned to the PNG's pixels, so the browser neither stretches it
    (blurry) nor makes it taller than the window; the slider is wide enough to steer."""
    widget = W.slider_figure(lambda fig, a: fig.add_subplot().plot([0, a]), figsize=(6.4, 4.6),
                             a=ipywidgets.FloatSlider(value=1.0))
    width, height = _png_size(bytes(widget.image.value))
    assert (width, height) == (640, 460)
    assert widget.image.layout.width == "640px" and widget.image.layout.height == "460px"
    assert widget.controls["a"].layout.width == W.SLIDER_WIDTH
    with pytest.raises(ValueError, match="must fit"):
        W.slider_figure(lambda fig, a: None, figsize=(19.0, 3.8), a=ipywidgets.FloatSlider())


@pytest.mark.parametrize("build", [
    lambda: W.temperature_widget(grid=40),
    lambda: W.log_z_spread_widget({"q": torch.randn(5000, generator=torch.Generator().manual_seed(0))},
                                  sizes=(16, 64), n_draws=20),
])
def test_course_widgets_fit_the_window_and_the_column(build):
    widget = build()
    width, height = _png_size(bytes(widget.image.value))
    assert width <= W.MAX_WIDGET_PX[0] and height <= W.MAX_WIDGET_PX[1]
    assert widget.image.layout.width == f"{width}px"


def test_slider_figure_rejects_bad_controls():
    with pytest.raises(ValueError, match="at least one control"):
        W.slider_figure(lambda fig: None)
    with pytest.raises(ValueError, match="not an ipywidgets value widget"):
        W.slider_figure(lambda fig, a: None, a=3.0)


def test_temperature_widget_slider_changes_image_and_exact_probability():
    n_figs = len(plt.get_fignums())
    widget = W.temperature_widget(grid=80)
    assert isinstance(widget, ipywidgets.Box)
    assert widget.state.kT == 1.0 and widget.state.energy_name == "double well"
    before = bytes(widget.image.value)
    assert before.startswith(PNG_SIGNATURE)

    widget.controls["kT"].value = 3.0
    assert bytes(widget.image.value) != before
    view = widget.state
    exact = DoubleWell2D(kT=3.0).well_probabilities()[0]
    assert view.kT == pytest.approx(3.0)
    assert view.deep_well_probability == pytest.approx(exact, abs=1e-12)
    assert f"{exact:.3f}" in view.title
    # independent check: the same mass summed from the displayed grid density
    assert view.deep_well_mass_on_grid == pytest.approx(exact, abs=1e-3)
    # redraws go to PNG, never to pyplot figures that pile up or get shown twice
    assert len(plt.get_fignums()) == n_figs


def test_temperature_widget_switches_energy():
    widget = W.temperature_widget(grid=60)
    widget.controls["energy"].value = "GMM-40"
    view = widget.state
    assert view.energy_name == "GMM-40" and view.deep_well_probability is None
    cell_area = float((view.xs[1] - view.xs[0]) * (view.ys[1] - view.ys[0]))
    assert float(view.density.sum()) * cell_area == pytest.approx(1.0, abs=1e-9)
    assert "PNG" not in repr(widget) and repr(widget) == "SliderFigure(energy='GMM-40', kT=1.0)"


def test_temperature_widget_kT_slider_is_logarithmic_over_its_decades():
    slider = W.temperature_widget(grid=30).controls["kT"]
    assert isinstance(slider, ipywidgets.FloatLogSlider)
    assert 10 ** slider.min == pytest.approx(0.1) and 10 ** slider.max == pytest.approx(10.0)
    # one step is the same factor anywhere: about 100 steps over the two decades
    assert 50 <= (slider.max - slider.min) / slider.step <= 200


def test_deep_well_probability_decreases_toward_one_half_as_kT_grows():
    window = W.DEFAULT_WINDOWS["double_well_2d"]
    kTs = [0.3, 0.5, 1.0, 2.0, 4.0, 8.0, 30.0]
    probs = [W.temperature_view(DoubleWell2D(), kT, window, grid=40).deep_well_probability for kT in kTs]
    assert all(p_hi > p_lo for p_hi, p_lo in zip(probs, probs[1:]))
    assert probs[0] > 0.999 and 0.5 < probs[-1] < 0.53
    assert probs[2] == pytest.approx(0.967, abs=5e-4)  # the documented kT = 1 value


def test_temperature_widget_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D energies"):
        W.temperature_widget({"many well": ManyWell()})
    with pytest.raises(ValueError, match="outside kT_range"):
        W.temperature_widget(kT=50.0)
    with pytest.raises(ValueError, match="no plot window"):
        W.temperature_widget({"other": GaussianMixture(name="other")})
    widget = W.temperature_widget({"MB": MullerBrown()}, kT=10.0, kT_range=(1.0, 100.0), grid=40)
    assert widget.state.energy_name == "MB"


def _lognormal_pool(mu: float, s: float, n: int = 100_000, seed: int = 0):
    import torch

    return mu + s * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_log_z_spread_widget_spread_shrinks_like_one_over_sqrt_n():
    # log w ~ N(mu, s^2): Z = E[w] = exp(mu + s^2 / 2) exactly
    mu, s = -0.3, 0.5
    exact = mu + s**2 / 2
    pools = {"lognormal": _lognormal_pool(mu, s), "shifted": _lognormal_pool(mu - 1.0, s, seed=1)}
    widget = W.log_z_spread_widget(pools, log_z_exact=exact, sizes=(16, 256, 4096), n_draws=400, size=16)
    assert isinstance(widget, ipywidgets.Box)
    small = widget.state
    assert small.size == 16 and set(small.estimates) == {"lognormal", "shifted"}
    before = bytes(widget.image.value)
    assert before.startswith(PNG_SIGNATURE)
    widget.controls["n"].value = 4096
    large = widget.state
    assert bytes(widget.image.value) != before
    # 256 times the samples: 16 times smaller spread (delta method: sd = sqrt((e^{s^2} - 1) / n))
    ratio = small.std("lognormal") / large.std("lognormal")
    assert 12 < ratio < 21, ratio
    assert large.std("lognormal") == pytest.approx(((2.718281828 ** (s**2) - 1) / 4096) ** 0.5, rel=0.2)
    assert abs(large.mean("lognormal") - exact) < 3 * large.std("lognormal") / 400**0.5 + 1e-3
    # a proposal that misses mass: just as tight, around log Z - 1
    assert abs(large.mean("shifted") - (exact - 1.0)) < 0.01
    # ESS fraction of the pool: exp(-s^2); small draws scatter around it
    assert large.pool_ess_fraction["lognormal"] == pytest.approx(2.718281828 ** (-s**2), rel=0.02)
    assert 0.0 < small.median_ess_fraction("lognormal") <= 1.0


def test_log_z_spread_widget_rejects_bad_input():
    pool = {"a": _lognormal_pool(0.0, 1.0, n=100)}
    with pytest.raises(ValueError, match="at least one pool"):
        W.log_z_spread_widget({})
    with pytest.raises(ValueError, match="increasing positive"):
        W.log_z_spread_widget(pool, sizes=(64, 16))
    with pytest.raises(ValueError, match="exceeds the pool of 100"):
        W.log_z_spread_widget(pool, sizes=(16, 1000), size=1000)
    with pytest.raises(ValueError, match="not one of sizes"):
        W.log_z_spread_widget(pool, sizes=(16, 32), size=20)
    import torch

    with pytest.raises(ValueError, match="not finite"):
        W.log_z_spread_widget({"a": torch.tensor([0.0, float("nan")] * 20)}, sizes=(4, 8))


def _noised_gmm_trajectory(n: int, n_frames: int, seed: int = 0):
    """Exact samples of p_t = GMM-40 * N(0, sigma_t^2 I) at each of n_frames times from 1 to 0."""
    import torch

    from boltzlab.diffusion import GeometricNoiseSchedule

    schedule = GeometricNoiseSchedule(0.01, 70.0)
    g = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture()
    times = torch.linspace(1.0, 0.0, n_frames)
    frames = [gmm.sample(n, g) + schedule.std(t.reshape(1)) * torch.randn(n, 2, generator=g) for t in times]
    return torch.stack(frames), times, schedule


def test_reverse_sde_widget_shows_exact_noised_density_and_mode_coverage():
    import torch

    trajectory, times, schedule = _noised_gmm_trajectory(2_000, 11)
    widget = W.reverse_sde_widget(trajectory, times, schedule, grid=60)
    first = widget.state
    assert first.index == 0 and first.t == 1.0
    assert first.sigma == pytest.approx(float(schedule.std(torch.tensor([1.0]))[0]))
    before = bytes(widget.image.value)
    assert before.startswith(PNG_SIGNATURE)
    widget.controls["t"].value = 10  # t = 0: exact GMM-40 samples cover every mode
    last = widget.state
    assert bytes(widget.image.value) != before
    assert last.t == 0.0 and last.sigma == 0.0 and last.modes_covered == 40
    # the density drawn at an intermediate t is the mixture with width sqrt(s^2 + sigma_t^2),
    # written out here from the normal density (the window holds nearly all of its mass)
    mid = W.denoising_view(trajectory, times, schedule, 4, grid=60)
    gmm = GaussianMixture()
    v = gmm.std**2 + mid.sigma**2
    X, Y = torch.meshgrid(mid.xs, mid.ys, indexing="xy")
    d2 = (X[..., None] - gmm.means[:, 0].double()) ** 2 + (Y[..., None] - gmm.means[:, 1].double()) ** 2
    exact = (torch.exp(-d2 / (2 * v)) / (2 * torch.pi * v)).mean(-1)
    assert 1.5 < mid.sigma < 5.0  # t = 0.6: modes widened but still apart
    assert torch.allclose(mid.density, exact, rtol=0.02, atol=1e-6)


def test_denoising_view_counts_a_collapsed_sampler_as_one_mode():
    import torch

    trajectory, times, schedule = _noised_gmm_trajectory(1_000, 3)
    collapsed = trajectory.clone()
    collapsed[-1] = GaussianMixture().means[7] + 0.5 * torch.randn(1_000, 2, generator=torch.Generator().manual_seed(1))
    view = W.denoising_view(collapsed, times, schedule, 2, grid=40)
    assert view.modes_covered == 1 and f"1/{view.n_modes} modes" in view.title


def test_reverse_sde_widget_rejects_bad_input():
    import torch

    trajectory, times, schedule = _noised_gmm_trajectory(50, 3)
    with pytest.raises(ValueError, match=r"shape \(n_steps \+ 1, B, 2\)"):
        W.reverse_sde_widget(trajectory[..., :1], times, schedule)
    with pytest.raises(ValueError, match=r"times must have shape \(3,\)"):
        W.reverse_sde_widget(trajectory, times[:2], schedule)
    bad = trajectory.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        W.reverse_sde_widget(bad, times, schedule)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        W.reverse_sde_widget(trajectory, times + 1.0, schedule)
    with pytest.raises(ValueError, match="index must be"):
        W.denoising_view(trajectory, times, schedule, 3)
    with pytest.raises(ValueError, match="2-D GaussianMixture"):
        W.denoising_view(trajectory, times, schedule, 0, mixture=DoubleWell2D())
    assert torch.isfinite(W.denoising_view(trajectory, times, schedule, 0, grid=20).density).all()


def _random_flow(loc=(0.5, -1.0), scale=(1.5, 0.8), n_layers=4):
    from boltzlab import flows

    return flows.realnvp(2, n_layers=n_layers, hidden=16, loc=list(loc), scale=list(scale), seed=3, zero_init=False)


def test_flow_stage_views_are_normalised_and_stage_zero_is_the_scaled_base():
    import torch

    flow = _random_flow()
    views = W.flow_stage_views(flow, ((-8.0, 9.0), (-7.0, 5.0)), grid=150)
    assert [v.layers for v in views] == [0, 1, 2, 3, 4]
    # every stage is a normalised density (the window holds all but ~1e-6 of each)
    assert all(abs(v.mass - 1) < 2e-3 for v in views), [v.mass for v in views]
    # stage 0 is N(loc, diag(scale^2)), written out here
    X, Y = torch.meshgrid(views[0].xs, views[0].ys, indexing="xy")
    exact = torch.exp(-((X - 0.5) / 1.5) ** 2 / 2 - ((Y + 1.0) / 0.8) ** 2 / 2) / (2 * torch.pi * 1.5 * 0.8)
    assert torch.allclose(views[0].density, exact, rtol=1e-4, atol=1e-9)
    # the random layers really move mass: the last stage is not the base
    assert float((views[-1].density - views[0].density).abs().max()) > 1e-2


def test_flow_stage_views_name_the_coordinate_each_layer_moves():
    import torch

    from boltzlab import flows

    flow = _random_flow()
    views = W.flow_stage_views(flow, ((-8.0, 9.0), (-7.0, 5.0)), grid=20)
    stages = flows.coupling_stages(flow)
    with torch.no_grad():
        xs = [stage.sample(200, generator=torch.Generator().manual_seed(0))[0] for stage in stages]
    for k in range(1, len(stages)):
        changed = tuple(int(i) for i in torch.nonzero((xs[k] - xs[k - 1]).abs().amax(0) > 1e-6).flatten())
        assert views[k].moved == changed, (k, views[k].moved, changed)
    assert views[1].moved == (1,) and "moves $x_2$" in views[1].title


def test_flow_stage_views_count_modes_of_a_mixture():
    from boltzlab import flows

    gmm = GaussianMixture()
    mode = gmm.means[3].tolist()
    flow = flows.realnvp(2, n_layers=2, loc=mode, scale=gmm.std)  # zero_init: N(mu_3, s^2) at every stage
    import torch

    views = W.flow_stage_views(flow, W.DEFAULT_WINDOWS["gmm40"], grid=40, mixture=gmm, n_samples=20_000,
                               generator=torch.Generator().manual_seed(1))
    for v in views:
        assert v.modes_covered == 1 and v.n_modes == 40
        # the 99.9% radius of an exact mode sample (a neighbour mode may take a few of its points)
        assert 0.99 < v.share_near_mode <= 1.0
        assert "(1/40)" in v.title


def test_flow_layers_widget_steps_through_the_stages():
    views = W.flow_stage_views(_random_flow(), ((-8.0, 9.0), (-7.0, 5.0)), grid=30)
    widget = W.flow_layers_widget(views)
    assert widget.state is views[-1]
    before = bytes(widget.image.value)
    assert before.startswith(PNG_SIGNATURE)
    widget.controls["layers"].value = 0
    assert widget.state is views[0] and bytes(widget.image.value) != before
    assert "scaled base" in widget.state.title


def test_flow_widgets_reject_bad_input():
    from boltzlab import flows

    with pytest.raises(ValueError, match="2-D boltzlab.flows.Flow"):
        W.flow_stage_views(flows.realnvp(3, n_layers=2), ((-1.0, 1.0), (-1.0, 1.0)))
    with pytest.raises(ValueError, match="n_samples"):
        W.flow_stage_views(_random_flow(), ((-1.0, 1.0), (-1.0, 1.0)), mixture=GaussianMixture(), n_samples=0)
    with pytest.raises(ValueError, match="2-D GaussianMixture"):
        W.flow_stage_views(_random_flow(), ((-1.0, 1.0), (-1.0, 1.0)), mixture=DoubleWell2D())
    with pytest.raises(ValueError, match="non-empty list of FlowStageView"):
        W.flow_layers_widget([])
    views = W.flow_stage_views(_random_flow(), ((-1.0, 1.0), (-1.0, 1.0)), grid=10)
    with pytest.raises(ValueError, match=r"value must be an int in \[0, 4\]"):
        W.flow_layers_widget(views, value=5)


def _rung(kT, ess, samples):
    from types import SimpleNamespace

    return SimpleNamespace(kT=kT, ess_fraction=ess, samples=samples)


def test_annealing_widget_shows_each_rung_with_its_modes():
    import torch

    gmm = GaussianMixture()
    g = torch.Generator().manual_seed(0)
    collapsed = gmm.means[5] + gmm.std * torch.randn(2_000, 2, generator=g)
    stages = [_rung(8.0, float("nan"), collapsed), _rung(1.0, 0.4, gmm.sample(2_000, g))]
    widget = W.annealing_widget(gmm, stages, W.DEFAULT_WINDOWS["gmm40"], grid=60)
    last = widget.state
    assert last.rung == 1 and last.kT == 1.0 and last.modes_covered == 40
    assert "pool ESS 0.40" in last.title
    # at kT = 1 the density drawn is the mixture itself, written out here
    X, Y = torch.meshgrid(last.xs, last.ys, indexing="xy")
    d2 = (X[..., None] - gmm.means[:, 0].double()) ** 2 + (Y[..., None] - gmm.means[:, 1].double()) ** 2
    exact = (torch.exp(-d2 / (2 * gmm.std**2)) / (2 * torch.pi * gmm.std**2)).mean(-1)
    assert torch.allclose(last.density, exact, rtol=0.02, atol=1e-6)
    before = bytes(widget.image.value)
    widget.controls["rung"].value = 0
    first = widget.state
    assert bytes(widget.image.value) != before
    assert first.modes_covered == 1 and "reverse KL" in first.title and first.kT == 8.0
    # a hotter target is flatter
    assert float(first.density.max()) < float(last.density.max())


def test_annealing_widget_rejects_bad_input():
    import torch

    gmm = GaussianMixture()
    stages = [_rung(1.0, 0.5, gmm.sample(10, torch.Generator().manual_seed(0)))]
    with pytest.raises(ValueError, match="at least one stage"):
        W.annealing_widget(gmm, [], W.DEFAULT_WINDOWS["gmm40"])
    with pytest.raises(ValueError, match=r"rung must be an int in \[0, 0\]"):
        W.annealing_view(gmm, stages, 1, W.DEFAULT_WINDOWS["gmm40"])
    with pytest.raises(ValueError, match="2-D energy"):
        W.annealing_view(ManyWell(), stages, 0, W.DEFAULT_WINDOWS["gmm40"])
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        W.annealing_view(gmm, [_rung(1.0, 0.5, torch.zeros(4, 3))], 0, W.DEFAULT_WINDOWS["gmm40"])
