"""Norm-entropy scatter: do heads attend more sharply where their queries are longer?

::

    capture = adapter.capture(prompt)
    norms = NormAnalysis.q_norms(capture)              # [L, H, T]
    entropy = EntropyAnalysis.token_entropy(capture)   # [L, H, T]
    norm_entropy_scatter(norms[..., 2:], entropy[..., 2:])

One point per (layer, head, position), coloured by layer; the title gives the Pearson r over
all points and its p-value (``CorrelationAnalysis.pearson_with_pvalue``). Per-head values are
``CorrelationAnalysis.norm_entropy_correlation``.
"""

from __future__ import annotations

from typing import Any

import torch

from oculi.errors import InputError
from oculi.visualize._common import new_axes


def norm_entropy_scatter(norms: Any, entropy: Any, *, title: str = "", ax: Any = None) -> Any:
    """Scatter of query norm (x) against attention entropy (y); returns the ``Axes``.

    Args:
        norms: query norms, e.g. ``[L, H, T]``.
        entropy: attention entropy (nats) of the same shape. Pairs where either value is
            ``NaN`` or infinite (padding) are left out, of the points and of r.
        title: text put before the correlation in the title.

    Raises:
        InputError: the shapes differ, or fewer than 3 finite pairs remain.
    """
    x = torch.as_tensor(norms).detach().double().cpu()
    y = torch.as_tensor(entropy).detach().double().cpu()
    if x.shape != y.shape:
        raise InputError(
            f"norms {list(x.shape)} and entropy {list(y.shape)} must have the same shape"
        )
    # imported here: the analysis package pulls in the capture code, which `import
    # oculi.visualize` leaves out
    from oculi.analysis.correlation import CorrelationAnalysis

    r, p = CorrelationAnalysis.pearson_with_pvalue(x, y)
    keep = (x.isfinite() & y.isfinite()).reshape(-1)
    ax = new_axes(ax, 6.0, 4.5)
    xs, ys = x.reshape(-1)[keep].numpy(), y.reshape(-1)[keep].numpy()
    if x.dim() > 1:  # coloured by the first dimension, the layer
        layer = torch.arange(x.shape[0]).reshape(-1, *[1] * (x.dim() - 1)).expand(x.shape)
        points = ax.scatter(xs, ys, c=layer.reshape(-1)[keep].numpy(), cmap="viridis", s=8)
        ax.figure.colorbar(points, ax=ax, label="layer")
    else:
        ax.scatter(xs, ys, s=8)
    ax.set_xlabel("query norm")
    ax.set_ylabel("attention entropy (nats)")
    lead = f"{title}: " if title else ""
    ax.set_title(f"{lead}Pearson r = {r:.3f} (p = {p:.2g}, n = {int(keep.sum())})")
    return ax
