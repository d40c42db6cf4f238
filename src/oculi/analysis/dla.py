"""Exact direct logit attribution: how much each component writes a token's logit.

::

    full = adapter.capture_full(ids, attention=CaptureConfig(capture_head_contributions=True))
    dla = AttributionMethods.direct_logit_attribution(full, target_id, position=-1)
    dla.values          # [L] each layer's attention + MLP write
    dla.heads           # [L, H] each head's write (needs head contributions in the capture)
    dla.total           # values.sum() + embedding + bias == the model's logit (dla.logit)

The residual stream entering the final norm is a sum: the embedding, then each layer's
attention and MLP outputs. The final norm is not linear, but with its per-position scale
frozen at the value the actual forward used it is (:mod:`oculi.analysis.readout`, which reads
that scale off the capture itself), so each component ``c`` writes ``u · c`` with
``u = a ⊙ W_U[target]`` (centred for LayerNorm), and the shares add up to the model's logit to
float precision. Everything constant (the final norm's bias, the unembedding bias) is ``.bias``.

Seed 000/001's form, ``direct_logit_attribution(residual, unembed, target, position=-1)`` on a
``ResidualCapture``, is just as exact: every residual capture that holds the last layer
records the final norm's output (``residual.final_normalized``). A capture that cannot know it
(an older file, some layers only) is refused with the call to make; ``raw=True`` asks for the
raw residual projected on ``W_U`` by name (not the model's logit; ``.note`` says so).

Heads go through each layer's own output projection and, in Gemma 2/3 and OLMo 2, the norm on
the attention output, whose per-position scale is frozen the same way by the capture
(``head_contributions``); with grouped-query attention each query head is its own share. The
output projection's bias belongs to no head: it is ``.attention_bias`` (0 where there is none),
so ``heads.sum(-1) + attention_bias == attention``.

Gemma 2 soft-caps the final logits, ``cap · tanh(z / cap)``, which is not linear in the
components; the attribution is then of the pre-cap logit ``z`` (``.logit``), the result says so
in ``.note``, and ``.capped_logit`` is what the model outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from oculi.analysis.readout import (
    FrozenNorm,
    LayerWrites,
    Readout,
    _frozen_map,  # noqa: F401 - importable from here as before the readout moved
    _gather,
    _rows,
    _squeeze,
    frozen_norm,
    readout,
)
from oculi.analysis.result import AttributionResult
from oculi.capture.structures import FullCapture, ResidualCapture
from oculi.errors import InputError

# the exact DLA machinery other analyses reuse (the readout's names importable from here too)
__all__ = [
    "FrozenNorm",
    "Readout",
    "attribute",
    "direct_logit_attribution",
    "frozen_norm",
    "readout",
]

_RAW_NOTE = (
    "raw=True: the residual is projected on W_U without the final norm, which is not the "
    "model's logit; the shares add up to that projection (.logit)"
)
_RAW_SOME_NOTE = (
    "raw=True on some layers: each held layer's attention and MLP output projected on W_U "
    "without the final norm; they add up to no logit (.logit, .embedding, .bias are None)"
)


def _project(stream: Tensor | LayerWrites, index: Tensor, u: Tensor) -> Tensor:
    """``stream [B, L, ..., T, d]`` at ``index [B, P]``, dotted with ``u [B, P, d]`` in
    float64: ``[B, P, L, ...]``.

    One layer at a time, so the float64 copy of the positions read stays small (all layers'
    per-head writes at every position would be a 50 MB copy for Gemma 3 270M).
    """
    out = []
    for layer in range(stream.shape[1]):
        share = _gather(stream[:, layer], index)  # [B, ..., P, d]
        ones = [1] * (share.dim() - 3)
        out.append((share * u.reshape(u.shape[0], *ones, *u.shape[1:])).sum(-1))
    return torch.stack(out, 1).movedim(-1, 1)  # [B, L, ..., P] -> [B, P, L, ...]


def _heads(full: Any, index: Tensor, u: Tensor, single: bool) -> Tensor | None:
    att = full.attention if isinstance(full, FullCapture) else None
    if att is None or att.head_contributions is None:
        return None
    n_model = att.metadata.get("n_layers_model", len(att.layers))
    if tuple(att.layers) != tuple(range(n_model)):
        return None
    contrib = _rows(att.head_contributions, single)  # [B, L, H, T, d]
    return _project(contrib, index, u)  # [B, P, L, H]


def attribute(r: Readout, heads: Tensor | None = None) -> AttributionResult:
    """The shares of a :class:`Readout`, ``[B, P, L]`` (``heads [B, P, L, H]`` if given),
    before squeezing: each layer's attention and MLP write, the embedding, the constant."""
    attention = _project(r.streams["attention"], r.index, r.u)
    mlp = _project(r.streams["mlp"], r.index, r.u)
    embedding = bias = None
    if r.streams["embedding"] is not None:
        embedding = (_gather(r.streams["embedding"], r.index) * r.u).sum(-1)
        bias = r.bias
    result = AttributionResult(
        values=attention + mlp,
        embedding=embedding,
        bias=bias,
        attention=attention,
        mlp=mlp,
        heads=heads,
        attention_bias=None if heads is None else attention - heads.sum(-1),
        logit=r.logit,
    )
    if r.raw:
        result.note = _RAW_NOTE if embedding is not None else _RAW_SOME_NOTE
    elif r.softcap and r.logit is not None:
        result.capped_logit = r.softcap * torch.tanh(r.logit / r.softcap)
        result.note = (
            f"this model soft-caps its final logits (cap * tanh(z / cap), cap = {r.softcap}), "
            "which is not linear in the components: the attribution is of the pre-cap logit z "
            "(.logit); .capped_logit is what the model outputs"
        )
    return result


def _dla(capture: Any, target: Any, position: Any, adapter: Any, **how: Any) -> AttributionResult:
    r = readout(capture, target, position, adapter, **how)
    result = attribute(r, _heads(capture, r.index, r.u, r.single))
    residual = capture if isinstance(capture, ResidualCapture) else capture.residual
    result.layers = tuple(residual.layers)
    result.metadata = {
        "target": target,
        "position": position,
        "positions": r.index.tolist(),
        "raw": r.raw,
    }
    for name in ("values", "embedding", "bias", "attention", "mlp", "heads", "attention_bias"):
        setattr(result, name, _squeeze(getattr(result, name), r.single, r.one_pos))
    result.logit = _squeeze(result.logit, r.single, r.one_pos)
    result.capped_logit = _squeeze(result.capped_logit, r.single, r.one_pos)
    return result


def dla_full(
    full: FullCapture,
    target: Any,
    position: int | Sequence[int] = -1,
    *,
    adapter: Any = None,
    raw: bool = False,
) -> AttributionResult:
    """Exact DLA on a :class:`FullCapture` (see the module docstring)."""
    return _dla(full, target, position, adapter, raw=raw)


def dla_residual(
    residual: ResidualCapture,
    unembed: Any,
    target: Any,
    position: int | Sequence[int] = -1,
    *,
    adapter: Any = None,
    final_norm: Any = None,
    raw: bool = False,
) -> AttributionResult:
    """The seed's form: a residual capture and the unembedding matrix ``[V, d]``, per layer.

    Exact through the final norm the capture records (or ``final_norm=``/``adapter=`` gives);
    refused where the norm cannot be known, unless ``raw=True``.
    """
    return _dla(
        residual, target, position, adapter, unembed=unembed, final_norm=final_norm, raw=raw
    )


def direct_logit_attribution(
    capture: Any,
    target: Any,
    *args: Any,
    position: int | Sequence[int] = -1,
    adapter: Any = None,
    final_norm: Any = None,
    raw: bool = False,
) -> AttributionResult:
    """Exact direct logit attribution of ``target`` at ``position``.

    Example::

        dla = AttributionMethods.direct_logit_attribution(full, paris_id, position=-1)
        dla.total            # == dla.logit == the model's logit for " Paris"
        AttributionMethods.direct_logit_attribution(full, (paris_id, rome_id))  # difference
        # seed 000/001's form, as exact:
        AttributionMethods.direct_logit_attribution(full.residual, model.lm_head.weight, paris_id)

    Two call forms:

    * ``(full, target, position=-1)`` on a :class:`FullCapture` with every layer's
      residual (``adapter.capture_full(ids)``'s defaults; add
      ``CaptureConfig(capture_head_contributions=True)`` for ``.heads``).
    * the seed's ``(residual, unembed, target, position=-1)`` on a ``ResidualCapture`` of
      every layer with ``W_U [V, d]`` (or the ``lm_head`` module). The final norm is the one
      the capture recorded; a capture without it (saved by an older oculi) needs
      ``adapter=`` (or ``final_norm=model.model.norm``) and is otherwise refused.

    Either way the final norm's per-position scale is frozen from the actual forward
    (:mod:`oculi.analysis.readout`), so the shares add up to the model's logit.

    Args:
        capture: the capture.
        target: a token id, or a pair ``(a, b)`` for the logit difference ``a - b``.
        position: a position counted among real tokens (``-1``: each row's last), or a list
            of them (adds a ``P`` dimension after the batch one).
        adapter: the model, for what a capture loaded from disk lacks.
        final_norm: the model's final norm module (seed form without a recorded norm).
        raw: project the raw residual on ``W_U`` without the final norm, by name: not the
            model's logit (``.note`` says so); with some layers only, just their shares.

    Returns:
        :class:`AttributionResult`: ``.values [L]`` (attention + MLP per layer),
        ``.attention``/``.mlp [L]``, ``.heads [L, H]``, ``.attention_bias [L]``,
        ``.embedding``, ``.bias``, ``.logit`` (what they add up to, pre-cap: ``.total``),
        ``.note`` (soft-cap or raw), each with a leading ``B`` for batches.

    Raises:
        InputError: a capture without every layer's residual, without a known final norm or
            unembedding (the message names the call to make), a target outside the vocabulary.
        IndexError: a position outside some row's real tokens.
    """
    if isinstance(capture, FullCapture):
        if args:
            position = args[0]
        if len(args) > 1:
            raise TypeError(
                "direct_logit_attribution(full, target, position=-1, adapter=None, raw=False)"
            )
        return dla_full(capture, target, position, adapter=adapter, raw=raw)
    if isinstance(capture, ResidualCapture):
        if (
            not (
                isinstance(target, torch.nn.Module)
                or isinstance(target, Tensor)
                and target.dim() == 2
            )
            or not args
        ):
            raise InputError(
                "with a ResidualCapture the call is direct_logit_attribution(residual, "
                "unembed [V, d], target_id, position=-1); a FullCapture needs no unembedding"
            )
        if len(args) > 2:
            raise TypeError("direct_logit_attribution(residual, unembed, target, position=-1)")
        pos = args[1] if len(args) > 1 else position
        return dla_residual(
            capture, target, args[0], pos, adapter=adapter, final_norm=final_norm, raw=raw
        )
    raise InputError(
        "direct_logit_attribution takes a FullCapture (adapter.capture_full(...)) or, in the "
        f"seed's form, a ResidualCapture and the unembedding; got {type(capture).__name__}"
    )
