"""Figures people would rather look at than read: schedule curves, FID vs trial, parameter
importance, a multi-objective study's Pareto front, and a scatter for vector-valued testbeds. Each returns a matplotlib Figure.

Figures are built with matplotlib's object API, not pyplot: no GUI backend is involved (headless
machines, worker threads), nothing accumulates in pyplot's figure registry over a long study, and
notebooks still display them inline.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _axes(figsize):
    fig = Figure(figsize=figsize)
    return fig, fig.add_subplot()


def schedules(curves: Mapping[str, Sequence[float]], title: str = "schedules", highlight: str | None = None):
    """σ against step for several schedules (log scale; a final σ = 0 is drawn at the axis floor,
    and a flow's σ₀ = ∞, which no log axis can hold, as a ▲ on the top edge, named in the legend)."""
    fig, ax = _axes((6.4, 4.2))
    positive = [s for c in curves.values() for s in c if 0 < s < np.inf]
    floor = min(positive) / 3 if positive else 1e-2
    infinite = False
    for name, sig in curves.items():
        s = np.asarray(sig, dtype=float)
        # NaN, not ∞: matplotlib would drop ∞ too, but silently and only by accident
        shown = np.where(np.isinf(s), np.nan, np.where(s > 0, s, floor))
        lw, alpha = (2.6, 1.0) if name == highlight else (1.3, 0.8)
        (line,) = ax.plot(np.arange(len(s)), shown, marker="o", ms=3.5, lw=lw, alpha=alpha,
                          label=name)
        steps = np.flatnonzero(np.isinf(s))
        if len(steps):
            infinite = True
            # x in data, y in axes units: the marker sits on the top edge whatever the y range
            ax.plot(steps, np.ones(len(steps)), ls="none", marker="^", ms=7, clip_on=False,
                    color=line.get_color(), transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("σ (σ = 0 drawn at the bottom)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if infinite:
        # a legend entry, not a text: it cannot collide with the curves or a long title
        ax.plot([], [], ls="none", marker="^", ms=7, color="0.35",
                label="σ₀ = ∞ (left off the log axis)")
    if len(curves) > 1 or infinite:
        ax.legend(fontsize=8)
    # fixed margins: tight_layout renders the figure once more, which was half the cost of the
    # per-trial plot
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)
    return fig


def fid_vs_trial(trials: Sequence[tuple[int, float]], baselines: Mapping[str, float] | None = None,
                 title: str = "FID proxy by trial"):
    """Each finished trial's FID, the best so far, and baselines as horizontal lines."""
    fig, ax = _axes((6.4, 4.2))
    if trials:
        num, val = zip(*sorted(trials))
        ax.scatter(num, val, s=14, color="tab:blue", alpha=0.7, label="trial")
        ax.step(num, np.minimum.accumulate(val), where="post", color="tab:blue", lw=2,
                label="best so far")
    for i, (name, v) in enumerate((baselines or {}).items()):
        ax.axhline(v, ls="--", lw=1, color=f"C{(i + 1) % 10}", label=name)
    ax.set_xlabel("trial")
    # trial numbers are integers; with a few trials the default locator ticks 0.25, 0.5, ...
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("FID proxy (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def pareto(points: Sequence[tuple[float, float]], front: Sequence[tuple[float, float]],
           baselines: Mapping[str, tuple[float, float]] | None = None, xlabel: str = "NFE",
           integer_x: bool = True, title: str = "Pareto front (search subset)"):
    """FID against a second objective: every finished trial as (x, FID), the front as a staircase
    through its points, baselines as labelled crosses — or as dashed lines where they lie beyond
    the trials' range (Karras at 20 steps would squash the budget's few NFE to one side)."""
    fig, ax = _axes((6.4, 4.2))
    right = max((x for x, _ in [*points, *front]), default=None)
    if points:
        ax.scatter(*zip(*points), s=14, color="tab:blue", alpha=0.45, label="trial")
    if front:
        x, y = zip(*sorted(front))
        ax.step(x, y, where="post", color="tab:red", lw=1.6, alpha=0.8)
        ax.scatter(x, y, s=30, color="tab:red", label="Pareto front", zorder=3)
    others = ["C2", "C1", "C4", "C5", "C6", "C8", "C9", "C7"]   # not the trials' or the front's
    for i, (name, (x, y)) in enumerate((baselines or {}).items()):
        color = others[i % len(others)]
        if right is not None and x > right:
            ax.axhline(y, ls="--", lw=1, color=color, label=f"{name} (NFE {x:g})")
        else:
            ax.scatter([x], [y], marker="x", s=40, color=color, label=name, zorder=4)
    ax.set_xlabel(xlabel)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("FID proxy (lower is better)")
    ax.set_yscale("log")   # one-call trials are often an order of magnitude worse
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def importance(values: Mapping[str, float], title: str = "parameter importance (fANOVA)"):
    fig, ax = _axes((5.6, 0.35 * max(3, len(values)) + 1.2))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="tab:green")
    ax.set_xlabel("importance")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def scatter(vectors: np.ndarray, title: str = "samples (first two dimensions)"):
    fig, ax = _axes((4.2, 4.2))
    v = np.asarray(vectors)
    ax.scatter(v[:, 0], v[:, 1], s=6, alpha=0.6)
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    return fig
