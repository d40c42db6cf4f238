"""Heatmaps of sweep results (needs the ``[viz]`` extra: matplotlib), and a text view.

::

    res = patching.activation_patching(adapter, clean, corrupt, metric=...)
    res.plot()                 # layer x position recovery, tokens on the x axis
    print(res.table())         # the same grid as text
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def heatmap(
    values: torch.Tensor,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "layer",
    center: float | None = 0.0,
    cmap: str = "RdBu_r",
    ax: Any = None,
) -> Any:
    """Draw ``values [rows, cols]`` as a heatmap; returns the matplotlib ``Axes``.

    With ``center`` the colour scale is symmetric around it (diverging map, white = center).
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plots need matplotlib: pip install 'oculi[viz]'") from e
    grid = values.detach().float().cpu()
    if grid.dim() != 2:
        raise ValueError(f"a heatmap needs a 2-D tensor, got shape {tuple(grid.shape)}")
    if ax is None:
        width = max(4.0, 0.45 * grid.shape[1] + 2)
        _, ax = plt.subplots(figsize=(width, max(3.0, 0.28 * grid.shape[0] + 1.5)))
    kwargs: dict[str, Any] = {}
    if center is not None:
        span = float((grid - center).abs().max()) or 1.0
        kwargs = dict(vmin=center - span, vmax=center + span)
    image = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, origin="upper", **kwargs)
    ax.figure.colorbar(image, ax=ax)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), list(col_labels), rotation=60, ha="right")
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), list(row_labels))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def text_grid(
    values: torch.Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    fmt: str = "{:6.2f}",
) -> str:
    """``values [rows, cols]`` as an aligned text table (columns labelled, rows labelled)."""
    grid = values.detach().float().cpu()
    if grid.dim() == 1:
        grid = grid[:, None]
    cells = [[fmt.format(float(v)) for v in row] for row in grid]
    width = max([len(c) for row in cells for c in row] + [len(str(c)) for c in col_labels])
    lead = max(len(str(r)) for r in row_labels)
    head = " " * lead + " " + " ".join(f"{str(c)[:width]:>{width}}" for c in col_labels)
    lines = [head]
    for label, row in zip(row_labels, cells):
        lines.append(f"{label!s:>{lead}} " + " ".join(f"{c:>{width}}" for c in row))
    return "\n".join(lines)
