"""Helpers shared by the figure modules: lazy matplotlib, tensors to arrays, token labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oculi.errors import require_extra


def pyplot() -> Any:
    """``matplotlib.pyplot``, or ``MissingExtraError`` saying to install ``oculi[viz]``."""
    return require_extra("matplotlib.pyplot", "viz")


def optional(module: str) -> Any:
    """Import an optional figure dependency (``sklearn.manifold``, ``umap``, ``networkx``)."""
    return require_extra(module, "viz")


def array(values: Any) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array-like, on the CPU."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def new_axes(ax: Any, width: float, height: float, projection: str | None = None) -> Any:
    """``ax`` itself, or the axes of a new figure of the given size."""
    if ax is not None:
        return ax
    plt = pyplot()
    fig = plt.figure(figsize=(width, height))
    return fig.add_subplot(projection=projection) if projection else fig.add_subplot()


def token_labels(tokens: Sequence[str] | None, n: int) -> list[str]:
    """``"i 'tok'"`` per position (``"i"`` without tokens), for axis ticks."""
    if not tokens:
        return [str(i) for i in range(n)]
    return [f"{i} {t!r}" for i, t in enumerate(tokens)]
