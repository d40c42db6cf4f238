"""Comparing activation records and summarising one (seed 002's ``compare_activations`` and
``get_activation_statistics``).

::

    cat, dog = analyzer.extract_activations("The cat"), analyzer.extract_activations("The dog")
    compare_activations(cat, dog, "model.layers.5")                 # mean cosine, same length
    compare_activations(cat, dog, 5, metric="l2", position=-1)      # one position each
    activation_statistics(cat, "model.layers.5")["std"]
"""

from __future__ import annotations

from typing import Any

import torch

from oculi.analyzer.records import ActivationRecord
from oculi.errors import InputError

METRICS = ("cosine", "l2")


def layer_of(record: ActivationRecord, layer: str | int) -> torch.Tensor:
    """A record's ``[T, d]`` activations at a module name or a layer index (negatives count
    from the end)."""
    names = list(record.layer_activations)
    if isinstance(layer, int) and not isinstance(layer, bool):
        if not -len(names) <= layer < len(names):
            raise InputError(
                f"layer {layer} out of range: this record holds {len(names)} layers "
                f"(0..{len(names) - 1})"
            )
        return record.layer_activations[names[layer]]
    if layer not in record.layer_activations:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise InputError(f"no layer {layer!r} in this record; it holds {shown}")
    return record.layer_activations[layer]


def compare_activations(
    first: ActivationRecord,
    second: ActivationRecord,
    layer: str | int,
    metric: str = "cosine",
    *,
    position: int | None = None,
) -> float:
    """How alike two prompts' activations are at one layer.

    Args:
        first, second: records (``ModelAnalyzer.extract_activations``).
        layer: a decoder layer's module name (``"model.layers.5"``) or its index.
        metric: ``"cosine"``: the cosine similarity of the two activations at each position,
            averaged; ``"l2"``: their Euclidean distance, averaged.
        position: compare this position of each record only (prompts may then differ in
            length); ``None`` compares position by position, which needs equal lengths.

    Example::

        a = analyzer.extract_activations("The cat sat")
        b = analyzer.extract_activations("The dog sat")
        compare_activations(a, b, layer=5, metric="cosine")    # a float in [-1, 1]
    """
    if metric not in METRICS:
        raise InputError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    a, b = layer_of(first, layer).double(), layer_of(second, layer).double()
    if position is None:
        if a.shape[0] != b.shape[0]:
            raise InputError(
                f"the records hold {a.shape[0]} and {b.shape[0]} tokens: compare them position "
                "by position only at equal lengths, or pass position= (e.g. -1, the last)"
            )
    else:
        a, b = _at(a, position, "first"), _at(b, position, "second")
    if metric == "cosine":
        return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    return float((a - b).norm(dim=-1).mean())


def _at(x: torch.Tensor, position: int, which: str) -> torch.Tensor:
    if not -x.shape[0] <= position < x.shape[0]:
        raise InputError(
            f"position {position} out of range for the {which} record's {x.shape[0]} tokens"
        )
    return x[position][None]


def activation_statistics(record: ActivationRecord, layer: str | int) -> dict[str, Any]:
    """Summary numbers of one layer's activations ``[T, d]``: ``mean``, ``std`` (over every
    entry, unbiased), ``min``, ``max``, ``norm`` (Frobenius), ``token_norm_mean`` and
    ``token_norm_max`` (each token's Euclidean norm), ``shape``.

    ::

        activation_statistics(analyzer.extract_activations("Hello"), "model.layers.5")["std"]
    """
    x = layer_of(record, layer).double()
    token_norms = x.norm(dim=-1)
    return {
        "mean": float(x.mean()),
        "std": float(x.std()) if x.numel() > 1 else 0.0,
        "min": float(x.min()),
        "max": float(x.max()),
        "norm": float(x.norm()),
        "token_norm_mean": float(token_norms.mean()),
        "token_norm_max": float(token_norms.max()),
        "shape": list(x.shape),
    }


get_activation_statistics = activation_statistics  # seed 002's name
"""Seed 002's name for :func:`activation_statistics`.

::

    get_activation_statistics(record, layer=5)["token_norm_mean"]
"""
