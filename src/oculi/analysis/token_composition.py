"""Per-token OV composition: how much of what one head wrote at each position a later head moves.

::

    capture = adapter.capture(ids)                       # patterns and values (the defaults)
    ov = CompositionAnalysis.ov_composition(capture, source=(1, 0), target=(2, 3))
    ov.values                     # [T]: per query position of the target head
    ov.metadata["per_key"]        # [T]: per position the source wrote at
    ov.metadata["v"]              # the weight-level V-composition (a scalar)

Seed 000 asks for OV composition as a ``[T]`` "value flow between heads" beside the weight-level
score. oculi defines it as the weight-level V-composition (Elhage et al. 2021, see
:mod:`oculi.analysis.composition`) with the source head's whole ``W_OV`` replaced by what it
actually wrote at each position. Write ``o_k = z_k W_O^src`` for the source head's write at
position ``k`` (``z = A^src V^src``, its attention-weighted values, or the captured
``head_outputs``), and ``W_OV^tgt = W_V^tgt W_O^tgt`` for the target head, norm gains folded as
in :class:`~oculi.analysis.weights.HeadWeights`. Then::

    per_key[k] = ‖o_k W_OV^tgt‖ / (‖o_k‖ ‖W_OV^tgt‖_F)      in [0, 1]
    values[t]  = Σ_k A^tgt[t, k] · per_key[k]

``per_key[k]`` is the share of the source's write at ``k`` that lies where the target's OV
circuit reads (0: in directions it ignores), with the same normalisation as the weight-level
score, so any per-token scale (the norms' RMS divisors) cancels and needs no residual.
``values[t]`` averages it over the keys the target's query ``t`` attends to: how much of what
the target moves into ``t`` is made of what the source wrote. Rotary embeddings do not touch
values, and projection biases are not composition (left out of ``W_OV``; a value bias is in
``z``, as the model computes it). Padded query positions of a batch are ``NaN``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from oculi.analysis._common import attention_of, is_batched, mark_padding
from oculi.analysis._common import field as capture_field
from oculi.analysis.result import CompositionResult
from oculi.analysis.weights import HeadWeights


def _source_z(att: Any, layer: int, head: int, batched: bool) -> Tensor:
    """The source head's output before ``W_O``, ``[B, T, D]`` in float64."""
    i = att.layer_index(layer)
    if att.head_outputs is not None:
        z = att.head_outputs[:, i, head] if batched else att.head_outputs[i, head][None]
        return z.double()
    patterns = capture_field(att, "patterns")
    values = capture_field(att, "values")
    kv = head // (att.n_heads // att.n_kv_heads)
    a = patterns[:, i, head] if batched else patterns[i, head][None]  # [B, T, T]
    v = values[:, i, kv] if batched else values[i, kv][None]  # [B, T, D]
    return a.double() @ v.double()


def ov_composition_per_token(
    capture: Any, weights: HeadWeights, source: tuple[int, int], target: tuple[int, int]
) -> CompositionResult:
    """Per-token OV composition of ``source`` into ``target`` (see the module docstring).

    Args:
        capture: an ``AttentionCapture`` (or ``FullCapture``) holding both heads' layers,
            with patterns and values (or ``head_outputs``) of the source and the target's
            patterns.
        weights: the model's :class:`HeadWeights`.
        source, target: checked ``(layer, head)`` pairs, ``source`` in an earlier layer.

    Returns:
        ``.values [T]`` (``[B, T]`` for batches), ``.metadata["per_key"]`` likewise,
        ``.metadata["v"]`` the weight-level V-composition.
    """
    att = attention_of(capture)
    patterns = capture_field(att, "patterns")
    batched = is_batched(patterns, "patterns")
    (l1, h1), (l2, h2) = source, target
    z = _source_z(att, l1, h1, batched)  # [B, T, D]
    w_o1 = weights.w_o[l1, h1].double().to(z.device)  # [D, d]
    write = z @ w_o1  # o_k, [B, T, d]
    w_v2 = weights.w_v[l2, h2].double().to(z.device)
    w_o2 = weights.w_o[l2, h2].double().to(z.device)
    read = (write @ w_v2) @ w_o2  # o_k W_OV^tgt
    ov_norm = (w_v2 @ w_o2).norm()
    denom = write.norm(dim=-1) * ov_norm
    per_key = torch.where(denom > 0, read.norm(dim=-1) / denom, torch.zeros_like(denom))
    i2 = att.layer_index(l2)
    a2 = (patterns[:, i2, h2] if batched else patterns[i2, h2][None]).double()
    values = (a2 @ per_key[..., None])[..., 0]  # [B, T]
    values = mark_padding(values if batched else values[0], att.metadata, batched)
    per_key = mark_padding(per_key if batched else per_key[0], att.metadata, batched)
    w_ov1 = weights.ov(l1, h1).double()
    v = float((w_ov1 @ weights.ov(l2, h2).double()).norm() / (w_ov1.norm() * ov_norm.cpu()))
    return CompositionResult(
        values,
        {"per_key": per_key, "v": v, "source": source, "target": target, "method": "per_token"},
    )
