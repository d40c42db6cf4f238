"""Embedding projections (seed 002): PCA (scikit-learn), t-SNE (scikit-learn) and UMAP
(umap-learn, the ``[umap]`` extra), in 2-D or 3-D.

::

    emb = adapter.model.get_input_embeddings().weight[ids]     # [N, d_model]
    plot_embeddings(emb, labels=words, method="pca")           # 2-D scatter, labelled
    plot_embeddings(emb, labels=words, method="tsne", dims=3)
    compare_methods(emb, labels=words)                         # PCA | t-SNE | UMAP
    layer_embeddings(coords, tokens, layers=[0, 6, 11])        # coords [n_layers, T, 2]
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from oculi.errors import require_extra
from oculi.visualize._common import array, new_axes, pyplot

METHODS = ("pca", "tsne", "umap")


def tsne_iterations(tsne: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the iteration count under the name the installed ``TSNE`` takes.

    scikit-learn 1.5 renamed t-SNE's ``n_iter`` to ``max_iter`` (1.7 removed the old name);
    seed 002 calls ``reduce_dimensions(..., method="tsne", n_iter=2000)``. Either name is
    accepted, not both.
    """
    given = [name for name in ("n_iter", "max_iter") if name in kwargs]
    if len(given) == 2:
        raise ValueError("pass max_iter or n_iter (its old name), not both")
    if not given:
        return kwargs
    out = dict(kwargs)
    name = "max_iter" if "max_iter" in inspect.signature(tsne).parameters else "n_iter"
    out[name] = out.pop(given[0])
    return out


def reduce_dimensions(
    points: Any, method: str = "pca", n_components: int = 2, *, seed: int = 0, **kwargs: Any
) -> np.ndarray:
    """Project ``points [N, D]`` to ``[N, n_components]``.

    t-SNE's perplexity and UMAP's ``n_neighbors`` default to what ``N`` allows (t-SNE needs
    perplexity < N), t-SNE's learning rate to ``max(N / 48, 10)``; other keyword arguments
    go to the estimator (t-SNE's ``n_iter`` as ``max_iter`` on scikit-learn ≥ 1.5).

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
        kwargs = tsne_iterations(manifold.TSNE, kwargs)
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
    """Scatter of the projected points, each labelled; Axes (3-D axes for ``dims=3``).

    ::

        plot_embeddings(vectors, labels, method="pca")    # vectors [N, D]
    """
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
    """The same points under several projections side by side (2-D); a Figure.

    ::

        fig = compare_methods(vectors, labels)     # vectors [N, D]: PCA, t-SNE, ... side by side
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4.5), squeeze=False)
    for ax, method in zip(axes[0], methods):
        plot_embeddings(points, labels, method=method, ax=ax)
    fig.tight_layout()
    return fig


def layer_embeddings(
    coords: Any,
    tokens: Sequence[str],
    layers: Sequence[int],
    *,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Token residuals at several layers in one shared 2-D projection; Axes.

    One scatter per layer (coloured from early to late), a grey line following each token
    through the layers, and each token labelled at its last-layer point.

    Args:
        coords: ``[n_layers, T, 2]``: the projected residuals, fitted on all layers together
            so positions are comparable across layers.
        tokens: the ``T`` tokens.
        layers: the model layer of each row of ``coords``.
    """
    xy = array(coords)
    if xy.ndim != 3 or xy.shape[-1] != 2 or xy.shape[:2] != (len(layers), len(tokens)):
        raise ValueError(
            f"coords must be [n_layers={len(layers)}, T={len(tokens)}, 2], got {xy.shape}"
        )
    plt = pyplot()
    ax = new_axes(ax, 7.0, 5.5)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(layers)))
    for t in range(len(tokens)):
        ax.plot(xy[:, t, 0], xy[:, t, 1], color="0.75", lw=0.8, zorder=1)
    for i, layer in enumerate(layers):
        ax.scatter(xy[i, :, 0], xy[i, :, 1], s=30, color=colours[i], label=f"layer {layer}",
                   zorder=2)  # fmt: skip
    for t, token in enumerate(tokens):
        ax.text(*xy[-1, t], f" {token}", fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title(title or "token residuals across layers")
    return ax
