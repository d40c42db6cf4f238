"""Attention-entropy figure: how focused each head is, layer × head.

::

    entropy = EntropyAnalysis.token_entropy(adapter.capture(prompt))   # [L, H, T], nats
    entropy_heatmap(entropy)              # mean over positions
    entropy_heatmap(entropy[..., 2:])     # leaving out the first rows, which see few keys

Low values are heads that attend to few tokens (0 for a one-hot row), high ones heads that
spread their attention (``log(t + 1)`` for a uniform row ``t``). ``ax.images[0].get_array()``
holds exactly the ``[L, H]`` values drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from oculi.errors import InputError
from oculi.visualize.heatmaps import heatmap


def entropy_heatmap(
    entropy: Any, *, layers: Sequence[int] | None = None, title: str = "", ax: Any = None
) -> Any:
    """Mean attention entropy per layer and head as a heatmap; returns the ``Axes``.

    Args:
        entropy: ``[L, H]`` (already averaged) or ``[L, H, T]`` per position, in nats, as
            ``EntropyAnalysis.token_entropy`` / ``mean_entropy`` return them; ``NaN``
            positions (padding) are left out of the mean.
        layers: the layer index of each row (``capture.layers``); ``0..L-1`` by default.
        title: the title; by default it says what is drawn.

    Raises:
        InputError: ``entropy`` is not 2-D or 3-D, or ``layers`` has the wrong length.
    """
    values = torch.as_tensor(entropy).detach().double().cpu()
    if values.dim() not in (2, 3):
        raise InputError(
            f"entropy must be [L, H] or [L, H, T] (one sequence), got shape "
            f"{list(values.shape)}; pick a row of a batch first"
        )
    grid = values.nanmean(-1) if values.dim() == 3 else values  # [L, H]
    names = list(layers) if layers is not None else list(range(grid.shape[0]))
    if len(names) != grid.shape[0]:
        raise InputError(f"{len(names)} layer labels for {grid.shape[0]} rows of entropy")
    what = "mean over positions" if values.dim() == 3 else "per head"
    return heatmap(
        grid,
        row_labels=[str(n) for n in names],
        col_labels=[str(h) for h in range(grid.shape[1])],
        title=title or f"attention entropy (nats), {what}",
        xlabel="head",
        center=None,
        cmap="viridis",
        ax=ax,
    )
