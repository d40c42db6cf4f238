"""Heatmaps (needs the ``[viz]`` extra: matplotlib), and the same grids as text.

::

    res = patching.activation_patching(adapter, clean, corrupt, metric=...)
    res.plot()                 # layer x position recovery, tokens on the x axis
    print(res.table())         # the same grid as text
    attention_heatmap(capture, layer=3, head=1, tokens=adapter.to_str_tokens(prompt))

``ax.images[0].get_array()`` of every heatmap holds exactly the values drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oculi.visualize._common import pyplot


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
    plt = pyplot()
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


def _pattern(capture: Any, layer: int, head: int) -> torch.Tensor:
    """``[T, T]`` pattern of one head from an ``AttentionCapture`` of one sequence."""
    patterns = getattr(capture, "patterns", None)
    if patterns is None:
        raise ValueError(
            "this capture holds no attention patterns; capture them with "
            "CaptureConfig(capture_patterns=True)"
        )
    if patterns.dim() != 4:
        raise ValueError(
            f"attention figures read one sequence; this capture holds a batch {tuple(patterns.shape)}"
        )
    n_heads = patterns.shape[1]
    if not 0 <= head < n_heads:
        raise ValueError(f"head {head} out of range: the capture has heads 0..{n_heads - 1}")
    return patterns[capture.layer_index(layer), head]


def attention_heatmap(
    capture: Any,
    layer: int | None = None,
    head: int | None = None,
    *,
    tokens: Sequence[str] | None = None,
    ax: Any = None,
) -> Any:
    """One head's attention pattern: query positions down, key positions across.

    Example::

        cap = adapter.capture("When Mary and John went to the store")
        attention_heatmap(cap, layer=3, head=1, tokens=adapter.to_str_tokens(prompt))

    Args:
        capture: an ``AttentionCapture`` of one sequence (with ``layer``/``head``), or a
            ``[T, T]`` pattern.
        layer, head: the model layer and head to draw.
        tokens: the prompt's tokens, to label the axes.
        ax: draw into these axes (default: a new figure).
    """
    if isinstance(capture, torch.Tensor):
        pattern, name = capture, "attention"
    else:
        if layer is None or head is None:
            raise ValueError("pass layer= and head= to draw one head of a capture")
        pattern, name = _pattern(capture, layer, head), f"attention L{layer} H{head}"
    from oculi.visualize._common import token_labels

    labels = token_labels(tokens, pattern.shape[-1])
    ax = heatmap(
        pattern, row_labels=labels, col_labels=labels, title=name, xlabel="key position",
        ylabel="query position", center=None, cmap="Blues", ax=ax,
    )  # fmt: skip
    image = ax.images[0]
    image.set_clim(0.0, 1.0)
    return ax


def attention_grid(
    capture: Any, layer: int, *, tokens: Sequence[str] | None = None, cols: int = 4
) -> Any:
    """Every head of one layer side by side (the view for spotting head types); a Figure.

    ::

        fig = attention_grid(adapter.capture(prompt), layer=3, tokens=adapter.to_str_tokens(prompt))
    """
    plt = pyplot()
    n_heads = capture.patterns.shape[1]
    cols = min(cols, n_heads)
    rows = -(-n_heads // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n_heads:
            ax.axis("off")
            continue
        ax.imshow(_pattern(capture, layer, h).float().cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{layer} H{h}")
        if tokens:
            ax.set_xticks(range(len(tokens)), list(tokens), rotation=90, fontsize=7)
            ax.set_yticks(range(len(tokens)), list(tokens), fontsize=7)
    fig.suptitle(f"attention patterns, layer {layer}")
    fig.tight_layout()
    return fig
