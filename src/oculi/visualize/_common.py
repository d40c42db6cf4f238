"""Helpers shared by the figure modules: lazy matplotlib, tensors to arrays, token labels,
and saving a figure whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oculi.capture.io.files import write_atomically
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


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig(path, **kwargs)`` written whole or not at all (a full disk leaves an
    existing file as it was); the format comes from ``path``'s suffix (``.png``, ``.svg``,
    ``.pdf``...), PNG without one. Returns ``path`` with ``~`` expanded.

    Raises:
        FileWriteError: a missing or read-only folder, or a failed write; names ``path``.
    """
    fmt = Path(os.fspath(path)).suffix.lower().lstrip(".") or "png"
    return write_atomically(
        path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs), overwrite=True, what="figure"
    )
