"""Figures for PNG plots: a matplotlib figure on its own Agg canvas (no pyplot state, no global backend switch)
and how it is saved. What every plot of the library draws on: the domains' own plots (:mod:`rkfast.tasks`)
and the run plots (:mod:`rkfast.plots`).

matplotlib's figure machinery is imported when the first figure is made, not with this module: every domain
module imports this one, and ``import rkfast`` imports every domain, so an eager import would add half a
second to every program that never plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # for the annotations only: the import itself waits for the first figure (see above)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure", "readable_log_axis", "mark_nonfinite", "DPI", "MIN_LOG_SPAN"]

DPI = 110  # the resolution of every saved plot
# a log axis needs this ratio between its largest and smallest value; below it a linear axis reads better
MIN_LOG_SPAN = 10.0
NONFINITE_GID = "nonfinite"  # the marks of mark_nonfinite: at the axes' edge, not data


def new_figure(**kwargs: Any) -> Figure:
    """A matplotlib figure on its own Agg canvas (``kwargs`` go to ``Figure``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path | str) -> None:
    """Lay out ``fig`` tightly and write it to ``path`` as a PNG at :data:`DPI`."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def _plotted_values(ax: Axes, axis: str) -> list[float]:
    """The finite values the lines and error bars of ``ax`` plot along ``axis`` (``"x"`` or ``"y"``)."""
    values: list[float] = []
    for line in ax.get_lines():
        if line.get_gid() == NONFINITE_GID:
            continue
        data = np.asarray(line.get_xdata() if axis == "x" else line.get_ydata(), dtype=np.float64)
        values += [float(v) for v in data.ravel() if math.isfinite(v)]
    for collection in ax.collections:  # error bars and bands: their path vertices
        for path in collection.get_paths():
            column = 0 if axis == "x" else 1
            column_values = np.asarray(path.vertices, dtype=np.float64)[:, column]
            values += [float(v) for v in column_values if math.isfinite(v)]
    return values


def readable_log_axis(ax: Axes, axis: str = "y", values: Sequence[float] | None = None) -> bool:
    """A log scale on ``ax``'s ``axis`` (``"x"`` or ``"y"``) whose ticks always carry labels, or a linear one
    where a log scale would not read: when the values (``values``, default: what ``ax`` plots so far) are not all
    positive or span less than :data:`MIN_LOG_SPAN`. A log axis is labelled with plain numbers (0.5, 2, 3)
    rather than powers of ten, the minor ticks at 2 and 5 (and 3) of each decade labelled too. Call it after
    plotting. Returns whether the axis is logarithmic."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

    data = [float(v) for v in (values if values is not None else _plotted_values(ax, axis))]
    finite = [v for v in data if math.isfinite(v)]
    use_log = bool(finite) and min(finite) > 0 and max(finite) / min(finite) >= MIN_LOG_SPAN
    target = ax.yaxis if axis == "y" else ax.xaxis
    ax.grid(True, which="both" if use_log else "major", alpha=0.3)
    if not use_log:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("linear")
        target.set_major_locator(MaxNLocator(nbins="auto"))
        return False
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(LogLocator(base=10.0))
    target.set_minor_locator(LogLocator(base=10.0, subs=(2.0, 3.0, 5.0)))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    return True


def mark_nonfinite(
    ax: Axes, x: Sequence[float], y: Sequence[float | None], color: Any, label: str | None = "non-finite"
) -> int:
    """Mark each point of ``(x, y)`` whose ``y`` is ``None`` or not finite (NaN, a diverged value) with an
    ``x`` at the top edge of ``ax``, in ``color``, so that it shows where a line would otherwise just stop;
    ``label`` names the marks in the legend. Returns how many points were marked."""
    bad = [xi for xi, yi in zip(x, y, strict=True) if yi is None or not math.isfinite(float(yi))]
    if bad:
        ax.plot(
            bad,
            [0.97] * len(bad),
            transform=ax.get_xaxis_transform(),  # x in data, y in axes coordinates: the top edge
            ls="",
            marker="x",
            ms=8,
            mew=2,
            color=color,
            clip_on=False,
            label=label,
            gid=NONFINITE_GID,
        )
    return len(bad)
