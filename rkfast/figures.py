"""Figures for PNG plots: a matplotlib figure on its own Agg canvas (no pyplot state, no global backend switch)
and how it is saved. What every plot of the library draws on: the domains' own plots (:mod:`rkfast.tasks`)
and the run plots (:mod:`rkfast.plots`).

matplotlib's figure machinery is imported when the first figure is made, not with this module: every domain
module imports this one, and ``import rkfast`` imports every domain, so an eager import would add half a
second to every program that never plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotations only: the import itself waits for the first figure (see above)
    from matplotlib.figure import Figure

__all__ = ["new_figure", "save_figure", "DPI"]

DPI = 110  # the resolution of every saved plot


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
