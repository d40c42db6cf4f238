"""Embedding projections to 2 or 3 dimensions: PCA and t-SNE (scikit-learn, the ``[viz]``
extra) and UMAP (umap-learn, the ``[umap]`` extra).

::

    proj = project(vectors, labels, method="pca")      # vectors [N, d]
    proj.coords                                        # [N, 2]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from oculi.errors import InputError, require_extra
from oculi.visualize.embeddings import tsne_iterations


@dataclass(frozen=True)
class Projection:
    """Points projected to 2 or 3 dimensions.

    Attributes:
        coords: ``[N, k]`` NumPy array.
        labels: one label per point.
        method: ``pca``, ``tsne`` or ``umap``.
        explained_variance_ratio: per component, for PCA.

    Example::

        projection = project(vectors, labels, method="pca")   # vectors [N, d]
        projection.coords.shape                                # (N, 2)
    """

    coords: Any
    labels: list[str]
    method: str
    explained_variance_ratio: Any = None


def project(
    vectors: Any, labels: list[str], method: str = "pca", n_components: int = 2, *,
    seed: int = 0, **kwargs: Any,
) -> Projection:  # fmt: skip
    """``vectors [N, d]`` projected by PCA, t-SNE or UMAP (see ``project_embeddings``).

    ::

        project(torch.randn(20, 640), [f"p{i}" for i in range(20)], "tsne").coords   # [20, 2]
    """
    if method not in ("pca", "tsne", "umap"):
        raise InputError(f"method must be 'pca', 'tsne' or 'umap', got {method!r}")
    if n_components not in (2, 3):
        raise InputError(f"n_components must be 2 or 3, got {n_components}")
    n = len(vectors)
    if n <= n_components:
        raise InputError(f"{n} points cannot be projected to {n_components} dimensions; "
                         f"give at least {n_components + 1}")  # fmt: skip
    if method == "pca":
        decomposition = require_extra("sklearn.decomposition", "viz")
        pca = decomposition.PCA(n_components=n_components, **kwargs)
        coords = pca.fit_transform(vectors)
        return Projection(coords, labels, method, pca.explained_variance_ratio_)
    if method == "tsne":
        manifold = require_extra("sklearn.manifold", "viz")
        kwargs.setdefault("perplexity", min(30.0, (n - 1) / 3))
        kwargs = tsne_iterations(manifold.TSNE, kwargs)  # seed 002's n_iter= on new sklearn
        reducer = manifold.TSNE(n_components=n_components, random_state=seed, **kwargs)
        return Projection(reducer.fit_transform(vectors), labels, method)
    umap = require_extra("umap", "umap")
    kwargs.setdefault("n_neighbors", min(15, n - 1))
    reducer = umap.UMAP(n_components=n_components, random_state=seed, **kwargs)
    # umap (through numba's thread pool) resets torch's thread count; put it back, or later
    # float32 sums run in another order
    threads = torch.get_num_threads()
    try:
        return Projection(reducer.fit_transform(vectors), labels, method)
    finally:
        torch.set_num_threads(threads)
