"""Direct effects on the vocabulary: which tokens a component's write promotes or suppresses.

::

    full = adapter.capture_full(ids, attention=CaptureConfig(capture_head_contributions=True))
    AttributionMethods.promoted_tokens(full, (5, 2), k=5)            # head 2 of layer 5
    # [(token_id, Δlogit), ...], best first
    AttributionMethods.promoted_tokens(full, ("mlp", 7), by="negative")   # most suppressed
    [adapter.tokenizer.decode([t]) for t, _ in top]                   # ids -> text

Direct logit attribution (:mod:`oculi.analysis.dla`) asks how much every component writes
*one* token's logit. This asks the transposed question: for *one* component's write ``c`` at
a position, how much does it change *every* token's logit? The final norm is frozen at the
scale the forward used, exactly as in DLA, so the change of token ``v``'s logit is

    Δz_v = W_U[v] · (a ⊙ c)              (RMSNorm)
    Δz_v = W_U[v] · (a ⊙ (c - mean(c)))   (LayerNorm: GPT-2, GPT-NeoX)

with ``a`` the frozen per-dimension scale at that position: one ``[V, d] @ [d]`` product.
The unembedding's bias and the norm's bias are the same for every write, so no component owns
them. The direct effect on a token is therefore that component's DLA share for it:
``promoted_tokens(full, (l, h))`` lists ``(t, dla(t).heads[l, h])`` for its top tokens ``t``.
It is the *direct* effect only: what later layers make of the write is not in it.

The ranking product runs in float32 (half-precision weights are widened a block of rows at a
time) so that Gemma's 262144 × 640 matrix is read once and never copied whole; the ``k``
values returned are then recomputed in float64 from their rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from oculi.analysis._common import capture_layer, check_index
from oculi.analysis.readout import Streams, _gather, _rows, frozen_norm
from oculi.capture.structures import FullCapture
from oculi.errors import InputError

# how many candidates beyond k the low-precision ranking keeps for the float64 re-ranking
_SPARE = 32
# floats of half-precision unembedding widened to float32 at once (16 MB)
_BLOCK_FLOATS = 4 * 2**20


def _write(full: FullCapture, component: Any, streams: Streams, single: bool) -> Tensor:
    """The component's residual write at every position, ``[B, T, d]`` (not yet float64)."""
    if not isinstance(component, tuple) or len(component) != 2:
        raise InputError(
            "component must be (layer, head) for a head, ('attn', layer) for a layer's "
            f"attention or ('mlp', layer) for its MLP; got {component!r}"
        )
    kind, where = component
    if isinstance(kind, str):
        if kind not in ("attn", "mlp"):
            raise InputError(
                f"unknown component kind {kind!r}; use 'attn', 'mlp' or a (layer, head) pair"
            )
        stream = streams["attention" if kind == "attn" else "mlp"]  # [B, L, T, d]
        return stream[:, check_index(where, stream.shape[1], "layer")]
    att = full.attention
    if att is None or att.head_contributions is None:
        raise InputError(
            "a head's write needs each head's contribution: capture with "
            "adapter.capture_full(..., attention=CaptureConfig(capture_head_contributions=True))"
        )
    contrib = _rows(att.head_contributions, single)  # [B, L, H, T, d]
    row = capture_layer(att.layers, kind, att.metadata.get("n_layers_model"))
    return contrib[:, row, check_index(where, contrib.shape[2], "head")]


def promoted_tokens(
    full: FullCapture,
    component: Any,
    position: int = -1,
    k: int = 10,
    by: str = "value",
    *,
    adapter: Any = None,
) -> list[tuple[int, float]] | list[list[tuple[int, float]]]:
    """The tokens whose logits a component's direct write raises (or lowers) the most.

    Example::

        top = AttributionMethods.promoted_tokens(full, (7, 3), position=-1, k=5)
        [(adapter.tokenizer.decode([t]), round(d, 2)) for t, d in top]

    Args:
        full: a :class:`FullCapture` with every layer's residual and the logits
            (``adapter.capture_full(ids)``'s defaults), plus
            ``CaptureConfig(capture_head_contributions=True)`` for heads.
        component: ``(layer, head)`` for one attention head, ``("attn", layer)`` for a
            layer's whole attention write, ``("mlp", layer)`` for its MLP write.
        position: a position among the real tokens (``-1``: the last).
        k: how many tokens.
        by: ``"value"`` (most promoted, the default) or ``"negative"`` (most suppressed).
        adapter: reads a LayerNorm's bias from the model, as in DLA (rarely needed).

    Returns:
        ``[(token_id, Δlogit), ...]``, ``k`` pairs best first, ``Δlogit`` the change of that
        token's (pre-cap) logit from this write alone, in float64. Token ids, since a capture
        holds no tokenizer: ``adapter.tokenizer.decode([token_id])`` spells one. A batch
        gives one such list per row.

    Raises:
        InputError: not a FullCapture, an unknown component, heads not captured.
        LayerIndexError: a layer the model (or the capture) does not have.
        IndexError: a head or a position out of range.
        ValueError: ``k`` not a positive int, ``by`` not ``"value"``/``"negative"``.
    """
    if not isinstance(full, FullCapture):
        raise InputError(f"promoted_tokens takes a FullCapture, got {type(full).__name__}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if by not in ("value", "negative"):
        raise ValueError(f"by must be 'value' or 'negative', got {by!r}")
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position must be an int, got {position!r}")
    f = frozen_norm(full, position, adapter)
    write = _gather(_write(full, component, f.streams, f.single), f.index)[:, 0]  # [B, d]
    if f.center:
        write = write - write.mean(-1, keepdim=True)
    g = f.a[:, 0] * write  # what reaches the unembedding, [B, d]
    w_u = f.unembed.detach()
    sign = 1.0 if by == "value" else -1.0
    rows = []
    for vec in g:
        # rank in float32 at least, then re-rank a few spare candidates in float64
        rough = _rank_product(w_u, vec)
        keep = (sign * rough).topk(min(k + _SPARE, rough.numel())).indices
        exact = w_u[keep].double() @ vec.to(w_u.device)
        best = (sign * exact).topk(min(k, exact.numel())).indices
        rows.append(list(zip(keep[best].tolist(), exact[best].tolist(), strict=True)))
    return rows[0] if f.single else rows


def _rank_product(w_u: Tensor, vec: Tensor) -> Tensor:
    """``W_U @ vec`` in float32 (or the weights' wider dtype), ``[V]``. Half-precision
    weights are widened a block of rows at a time, so no float32 copy of the whole
    unembedding (671 MB for Gemma 3 270M) is made."""
    if w_u.dtype not in (torch.float16, torch.bfloat16):
        return w_u @ vec.to(w_u.device, w_u.dtype)
    vec = vec.to(w_u.device, torch.float32)
    step = max(1, _BLOCK_FLOATS // w_u.shape[1])
    return torch.cat([w_u[i : i + step].float() @ vec for i in range(0, w_u.shape[0], step)])
