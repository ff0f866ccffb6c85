"""The figures in schedsearch.plots say what they leave out and label their axes sensibly."""

import math

import numpy as np

from schedsearch import plots


def _legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_a_flow_schedule_marks_its_infinite_start_and_still_draws_the_finite_points():
    flow = [math.inf, 3.0, 1.0, 0.3, 0.0]
    fig = plots.schedules({"flow 4": flow}, "one flow schedule")
    ax = fig.axes[0]
    # the note is in the legend even with a single curve (no legend was drawn for one before)
    assert any("σ₀ = ∞" in t for t in _legend_texts(ax))
    curve = next(ln for ln in ax.get_lines() if ln.get_label() == "flow 4")
    y = np.asarray(curve.get_ydata(), dtype=float)
    assert np.isnan(y[0])                                   # σ₀ itself is not on the axis
    np.testing.assert_allclose(y[1:4], [3.0, 1.0, 0.3])     # the finite σ are
    floor = y[4]
    assert 0 < floor < 0.3                                  # σ = 0 at the axis floor
    # a ▲ at step 0, on the top edge (axes y = 1), in the curve's colour
    marks = [ln for ln in ax.get_lines() if ln.get_marker() == "^" and len(ln.get_xdata())]
    assert len(marks) == 1
    assert list(marks[0].get_xdata()) == [0] and list(marks[0].get_ydata()) == [1.0]
    assert marks[0].get_color() == curve.get_color()
    # the marker does not stretch the log axis: its top is set by the finite σ
    assert ax.get_ylim()[1] < 10


def test_finite_schedules_carry_no_infinity_note():
    fig = plots.schedules({"a": [14.6, 1.0, 0.0], "b": [10.0, 0.5, 0.0]})
    texts = _legend_texts(fig.axes[0])
    assert texts == ["a", "b"]
    assert not [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "^"]


def test_fid_vs_trial_ticks_whole_trial_numbers_only():
    fig = plots.fid_vs_trial([(0, 9.0), (1, 8.0), (2, 8.5)], {"karras": 10.0})
    ax = fig.axes[0]
    ticks = ax.get_xticks()
    lo, hi = ax.get_xlim()
    shown = [t for t in ticks if lo <= t <= hi]
    assert len(shown) >= 2
    assert all(float(t).is_integer() for t in shown), shown
