"""Tests of boltzlab.widgets without a browser: build, move a control, read the PNG and the state."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import ipywidgets  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

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
