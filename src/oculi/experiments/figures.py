"""Figures of experiment results (matplotlib, the ``[viz]`` extra), without pyplot state.

Each function returns a ``matplotlib.figure.Figure`` that nothing else references, so runs
never accumulate open figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oculi.errors import require_extra


def new_figure(width: float = 6.4, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    """``(figure, axes)`` of a fresh figure (axes is a list when ``ncols > 1``)."""
    require_extra("matplotlib", "viz")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, (list(axes) if ncols > 1 else axes)


def plotted(plot: Any, width: float, height: float) -> Any:
    """The figure of ``plot(ax=...)`` (a result's own ``.plot`` method) on a fresh figure."""
    fig, ax = new_figure(width, height)
    plot(ax=ax)
    return fig


def grid_size(rows: int, cols: int) -> tuple[float, float]:
    """A readable figure size for a ``rows x cols`` heatmap."""
    return max(4.0, 0.45 * cols + 2.5), max(3.0, 0.3 * rows + 1.5)


def line(
    x: Sequence[Any],
    series: dict[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    labels: Sequence[str] | None = None,
    logy: bool = False,
) -> Any:
    """Lines of ``series`` over ``x``; ``labels`` annotate each point of the first series."""
    fig, ax = new_figure()
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    if labels is not None:
        first = next(iter(series.values()))
        for xi, yi, text in zip(x, first, labels):
            ax.annotate(
                repr(text),
                (xi, yi),
                fontsize=7,
                rotation=45,
                textcoords="offset points",
                xytext=(0, 4),
            )
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(series) > 1:
        ax.legend()
    return fig
