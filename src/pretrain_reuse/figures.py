"""Figures the package writes to files, made without pyplot.

A :class:`matplotlib.figure.Figure` built directly belongs to no backend and to no pyplot state:
writing a run's PNGs neither switches the caller's backend (a notebook's inline one) nor leaves
figures open in pyplot's list. The value objects' ``plot(ax=None)`` methods, meant for
interactive use, draw on pyplot's current axes instead.
"""

from __future__ import annotations

from pathlib import Path

from .artifacts import atomic_path


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
             squeeze: bool = True):
    """``(figure, axes)`` as :func:`matplotlib.pyplot.subplots` returns them, outside pyplot."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def save_png(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)
