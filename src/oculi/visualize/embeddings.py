"""Embedding projections (seed 002): PCA (scikit-learn), t-SNE (scikit-learn) and UMAP
(umap-learn, the ``[umap]`` extra), in 2-D or 3-D.

::

    emb = adapter.model.get_input_embeddings().weight[ids]     # [N, d_model]
    plot_embeddings(emb, labels=words, method="pca")           # 2-D scatter, labelled
    plot_embeddings(emb, labels=words, method="tsne", dims=3)
    compare_methods(emb, labels=words)                         # PCA | t-SNE | UMAP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oculi.errors import require_extra
from oculi.visualize._common import array, new_axes, pyplot

METHODS = ("pca", "tsne", "umap")


def reduce_dimensions(
    points: Any, method: str = "pca", n_components: int = 2, *, seed: int = 0, **kwargs: Any
) -> np.ndarray:
    """Project ``points [N, D]`` to ``[N, n_components]``.

    t-SNE's perplexity and UMAP's ``n_neighbors`` default to what ``N`` allows (t-SNE needs
    perplexity < N), t-SNE's learning rate to ``max(N / 48, 10)``; other keyword arguments
    go to the estimator.

    Raises:
        ValueError: an unknown method, or fewer points than the method needs.
        MissingExtraError: scikit-learn (``oculi[viz]``) or umap-learn (``oculi[umap]``)
            missing.
    """
    x = array(points)
    if x.ndim != 2:
        raise ValueError(f"points must be [N, D], got shape {x.shape}")
    n = x.shape[0]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if n_components not in (2, 3):
        raise ValueError(f"n_components must be 2 or 3, got {n_components}")
    if n <= n_components:
        raise ValueError(
            f"{method} into {n_components} dimensions needs more than {n_components} points, got {n}"
        )
    if method == "pca":
        decomposition = require_extra("sklearn.decomposition", "viz")
        return decomposition.PCA(
            n_components=n_components, random_state=seed, **kwargs
        ).fit_transform(x)
    if method == "tsne":
        manifold = require_extra("sklearn.manifold", "viz")
        kwargs.setdefault("perplexity", min(30.0, (n - 1) / 3))
        kwargs.setdefault("init", "pca")
        # scikit-learn's "auto" rate (N / 48) without its floor of 50, which overshoots on
        # the few dozen points of a token set (3-D runs then scatter the clusters)
        kwargs.setdefault("learning_rate", max(n / 48.0, 10.0))
        return manifold.TSNE(n_components=n_components, random_state=seed, **kwargs).fit_transform(
            x
        )
    umap = require_extra("umap", "umap")
    kwargs.setdefault("n_neighbors", max(2, min(15, n - 1)))
    kwargs.setdefault("init", "random")
    kwargs.setdefault("n_jobs", 1)  # a seed makes UMAP single-threaded anyway
    # UMAP's numba/OpenMP start-up resets torch's intra-op thread count (which changes the
    # order of float sums in later model runs): put it back
    threads = torch.get_num_threads()
    try:
        return umap.UMAP(n_components=n_components, random_state=seed, **kwargs).fit_transform(x)
    finally:
        torch.set_num_threads(threads)


def plot_embeddings(
    points: Any,
    labels: Sequence[str] | None = None,
    *,
    method: str = "pca",
    dims: int = 2,
    ax: Any = None,
    title: str | None = None,
    **kwargs: Any,
) -> Any:
    """Scatter of the projected points, each labelled; Axes (3-D axes for ``dims=3``)."""
    coords = reduce_dimensions(points, method, dims, **kwargs)
    ax = new_axes(ax, 6.0, 5.0, projection="3d" if dims == 3 else None)
    ax.scatter(*coords.T, s=30, color="#2563eb")
    for i, label in enumerate(labels or []):
        ax.text(*coords[i], f" {label}", fontsize=8)
    ax.set_title(title or f"{method.upper() if method == 'pca' else method} projection ({dims}-D)")
    return ax


def compare_methods(
    points: Any, labels: Sequence[str] | None = None, *, methods: Sequence[str] = METHODS
) -> Any:
    """The same points under several projections side by side (2-D); a Figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4.5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        plot_embeddings(points, labels, method=method, ax=ax)
    fig.tight_layout()
    return fig
