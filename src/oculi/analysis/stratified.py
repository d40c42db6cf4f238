"""Slicing per-head results, and finding the heads at the extremes.

::

    entropy = EntropyAnalysis.token_entropy(capture)             # [L, H, T]
    StratifiedView.by_head(entropy, layer=3, head=1)               # [T]
    find_extreme_heads(entropy, k=5, mode="min")                   # the 5 most focused heads

The tensors here are plain ``[L, H, T]`` or ``[L, H]`` results, indexed by position in the
capture's layer list. When a capture holds only some layers, pass ``layers=capture.layers``
to speak in model layer indices instead (both for the ``layer`` arguments and for the layers
:func:`find_extreme_heads` reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import capture_layer, check_index


def _check_dims(tensor: Tensor, allowed: tuple[int, ...], what: str) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    if tensor.dim() not in allowed:
        names = " or ".join({2: "[L, H]", 3: "[L, H, T]"}[d] for d in allowed)
        raise ValueError(f"{what} takes a {names} tensor, got shape {tuple(tensor.shape)}")


def _layer_position(tensor: Tensor, layer: int, layers: Sequence[int] | None) -> int:
    if layers is None:
        return check_index(layer, tensor.shape[0], "layer")
    if len(layers) != tensor.shape[0]:
        raise ValueError(
            f"layers lists {len(layers)} layers but the tensor holds {tensor.shape[0]}"
        )
    return capture_layer(tuple(layers), layer, None)


class StratifiedView:
    """Views of ``[L, H, T]`` per-head, per-position results."""

    @staticmethod
    def by_layer(
        tensor: Float[Tensor, "layer head *pos"], layer: int, layers: Sequence[int] | None = None
    ) -> Float[Tensor, " head *pos"]:
        """One layer: ``[H, T]`` from ``[L, H, T]`` (``[H]`` from ``[L, H]``).

        Raises:
            IndexError: ``layer`` out of range (the message gives the valid ones).
        """
        _check_dims(tensor, (2, 3), "by_layer")
        return tensor[_layer_position(tensor, layer, layers)]

    @staticmethod
    def by_head(
        tensor: Float[Tensor, "layer head *pos"],
        layer: int,
        head: int,
        layers: Sequence[int] | None = None,
    ) -> Float[Tensor, "*pos"]:
        """One head: ``[T]`` from ``[L, H, T]`` (a scalar tensor from ``[L, H]``)."""
        _check_dims(tensor, (2, 3), "by_head")
        i = _layer_position(tensor, layer, layers)
        return tensor[i, check_index(head, tensor.shape[1], "head")]

    @staticmethod
    def by_token(
        tensor: Float[Tensor, "layer head pos"], position: int
    ) -> Float[Tensor, "layer head"]:
        """One query position of every head: ``[L, H]`` from ``[L, H, T]``."""
        _check_dims(tensor, (3,), "by_token")
        return tensor[..., check_index(position, tensor.shape[-1], "position")]


def find_extreme_heads(
    scores: Float[Tensor, "layer head *pos"],
    k: int = 10,
    mode: Literal["max", "min"] = "max",
    layer_range: tuple[int, int] | None = None,
    layers: Sequence[int] | None = None,
) -> list[tuple[int, int, float]]:
    """The ``k`` heads with the highest (or lowest) score.

    Example::

        for layer, head, value in find_extreme_heads(entropy, k=5, mode="min"):
            print(f"L{layer}H{head}: {value:.3f}")

    Args:
        scores: ``[L, H]``, or ``[L, H, T]`` (averaged over positions first, NaN skipped).
        k: how many heads; fewer come back if fewer have a score.
        mode: ``"max"`` for the highest, ``"min"`` for the lowest.
        layer_range: ``(start, stop)``, half-open like ``range``: only layers
            ``start <= layer < stop`` are searched.
        layers: the model layer index of each row of ``scores`` (``capture.layers``); when
            given, ``layer_range`` and the reported layers use model indices.

    Returns:
        ``[(layer, head, score), ...]``, best first; heads whose score is NaN are skipped.

    Raises:
        ValueError: a bad ``mode``, ``k`` or ``layer_range``, or ``scores`` of another shape.
    """
    _check_dims(scores, (2, 3), "find_extreme_heads")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    per_head = scores.float()
    if per_head.dim() == 3:
        per_head = per_head.nanmean(-1)
    n_layers = per_head.shape[0]
    names = list(layers) if layers is not None else list(range(n_layers))
    if len(names) != n_layers:
        raise ValueError(f"layers lists {len(names)} layers but scores hold {n_layers}")
    rows = list(range(n_layers))
    if layer_range is not None:
        if len(layer_range) != 2 or layer_range[0] > layer_range[1]:
            raise ValueError(
                f"layer_range must be (start, stop) with start <= stop, got {layer_range!r}"
            )
        start, stop = layer_range
        rows = [i for i in rows if start <= names[i] < stop]
        if not rows:
            raise ValueError(
                f"layer_range={tuple(layer_range)} selects no layer; the layers are "
                f"{names[0]}..{names[-1]}"
            )
    candidates = per_head[rows].detach().cpu()
    flat = candidates.flatten()
    valid = (~flat.isnan()).nonzero().flatten()
    order = flat[valid].argsort(descending=(mode == "max"), stable=True)
    picked = valid[order[:k]]
    n_heads = per_head.shape[1]
    out = []
    for index in picked.tolist():
        row, head = divmod(index, n_heads)
        out.append((names[rows[row]], head, float(flat[index])))
    return out
