"""Exact direct logit attribution: how much each component writes a token's logit.

::

    full = adapter.capture_full(ids, attention=CaptureConfig(capture_head_contributions=True))
    dla = AttributionMethods.direct_logit_attribution(full, target_id, position=-1)
    dla.values          # [L] each layer's attention + MLP write
    dla.heads           # [L, H] each head's write (needs head contributions in the capture)
    dla.total           # values.sum() + embedding + bias == the model's logit (dla.logit)

The residual stream entering the final norm is a sum: the embedding, then each layer's
attention and MLP outputs. The final norm is not linear (it divides by the residual's RMS or
standard deviation), but once its per-position scale is frozen at the value the actual forward
used, it is: ``norm(x) = a ⊙ x`` for RMSNorm and ``a ⊙ (x - mean(x)) + b`` for LayerNorm,
with ``a`` per position and dimension. oculi reads ``a`` off the capture itself, as the ratio of
the final normalised residual (``full.logits.final_normalized``) to the residual entering the
norm (the last layer's ``post_mlp``), so each component ``c`` writes
``u · c`` with ``u = a ⊙ W_U[target]`` (centred for LayerNorm), and the shares add up to the
model's logit to float precision. Everything constant (the final norm's bias, the unembedding
bias) is ``.bias``.

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
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import as_positions, real_positions
from oculi.analysis.result import AttributionResult
from oculi.capture.structures import FullCapture, ResidualCapture
from oculi.errors import InputError

# families whose final norm is a LayerNorm with a bias (the rest use RMSNorm)
_LAYERNORM_FAMILIES = frozenset({"gpt2", "gpt_neox"})


# -- inputs ---------------------------------------------------------------------------------
def _direction(w_u: Tensor, bias: Tensor | None, target: Any) -> tuple[Tensor, Tensor]:
    """``(W_U[t] [d], bias[t])`` for a token, or their differences for a pair ``(a, b)``."""
    vocab = w_u.shape[0]

    def token(t: Any) -> int:
        if isinstance(t, Tensor) and t.numel() == 1:
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"target must be a token id or a pair (a, b) of ids, got {t!r}")
        if not 0 <= t < vocab:
            raise InputError(f"target token id {t} outside the vocabulary 0..{vocab - 1}")
        return t

    ids = [token(t) for t in target] if isinstance(target, tuple) else [token(target)]
    if len(ids) not in (1, 2):
        raise InputError(f"target must be one token id or a pair (a, b), got {target!r}")
    w = w_u[ids].double()
    b = bias[ids].double() if bias is not None else torch.zeros(len(ids), dtype=torch.float64)
    if len(ids) == 2:
        return w[0] - w[1], b[0] - b[1]
    return w[0], b[0]


def _rows(tensor: Tensor, single: bool) -> Tensor:
    return tensor[None] if single else tensor


def _streams(residual: ResidualCapture) -> dict[str, Tensor]:
    """``embedding [B, T, d]``, ``attention``/``mlp`` ``[B, L, T, d]``, ``final [B, T, d]``."""
    single = residual.metadata.get("single", True)
    n_model = residual.metadata.get("n_layers_model", len(residual.layers))
    if tuple(residual.layers) != tuple(range(n_model)):
        raise InputError(
            f"direct logit attribution needs every layer's residual (0..{n_model - 1}); this "
            f"capture holds layers {list(residual.layers)}"
        )

    def get(name: str) -> Tensor | None:
        tensor = getattr(residual, name)
        return None if tensor is None else _rows(tensor, single)

    pre, mid, post = get("pre_attn"), get("post_attn"), get("post_mlp")
    attn, mlp = get("attn_out"), get("mlp_out")
    if pre is None or post is None or (mid is None and (attn is None or mlp is None)):
        raise InputError(
            "direct logit attribution needs the residual before each block and after it, plus "
            "after attention (or both branch outputs); capture with ResidualConfig() defaults "
            "(pre_attn, post_attn, post_mlp) or capture_attn_out=True, capture_mlp_out=True"
        )
    assert pre is not None and post is not None  # checked above
    if attn is None:
        assert mid is not None
        attn = mid - pre
    if mlp is None:
        mlp = post - (mid if mid is not None else pre + attn)
    return {"embedding": pre[:, 0], "attention": attn, "mlp": mlp, "final": post[:, -1]}


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor [B, ..., T, d]`` at ``index [B, P]`` -> ``[B, ..., P, d]`` in float64."""
    b = torch.arange(tensor.shape[0])
    moved = tensor.movedim(-2, 1)  # [B, T, ..., d]
    return moved[b[:, None], index.to(moved.device)].movedim(1, -2).double()


# -- the frozen final norm ------------------------------------------------------------------
def _frozen_map(
    x: Tensor, normed: Tensor, norm_bias: Tensor | None, center: bool
) -> tuple[Tensor, Tensor]:
    """Per position ``a [B, P, d]`` with ``normed = a ⊙ (x - centre) + bias``, and the bias.

    ``a`` is read as a ratio, so ``a ⊙ x`` reproduces ``normed`` to float64 rounding. A
    coordinate where the (centred) residual is exactly 0 adds nothing there whatever ``a``
    is; it gets ``a = 0``.
    """
    b = norm_bias.double().to(x.device) if norm_bias is not None else torch.zeros_like(x[0, 0])
    xc = x - x.mean(-1, keepdim=True) if center else x
    zero = xc == 0
    a = (normed - b) / torch.where(zero, torch.ones_like(xc), xc)
    return a.masked_fill(zero, 0.0), b


def _final_norm_bias(family: str | None, adapter: Any, recorded: Any) -> tuple[Tensor | None, bool]:
    """``(the final LayerNorm's bias, centred)``: from ``adapter`` when given, else as the
    capture recorded it; RMSNorm families have neither."""
    if family not in _LAYERNORM_FAMILIES:
        return None, False
    if adapter is not None:
        return adapter.final_norm_bias(), True
    if recorded is None:
        raise InputError(
            f"the final norm of a {family} model is a LayerNorm whose bias this capture does "
            "not hold (loaded from disk?); call full.logits.attach_unembedding(adapter) or "
            "pass adapter="
        )
    return recorded, True


def _project(stream: Tensor, index: Tensor, u: Tensor) -> Tensor:
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


def _squeeze(t: Tensor | None, single: bool, one_pos: bool) -> Tensor | None:
    if t is None:
        return None
    if one_pos:
        t = t[:, 0]
    return t[0] if single else t


# -- the attribution -------------------------------------------------------------------------
@dataclass
class FrozenNorm:
    """The final norm of ``full`` frozen at the positions asked for.

    A residual write ``c [B, P, d]`` at those positions reaches the unembedding as
    ``a ⊙ (c - mean(c))`` (``center``, LayerNorm) or ``a ⊙ c`` (RMSNorm); ``b [d]`` is the
    constant the norm adds. ``index [B, P]`` holds the tensor columns of the positions,
    ``normed [B, P, d]`` the model's normalised residual there.
    """

    index: Tensor
    a: Tensor
    b: Tensor
    center: bool
    normed: Tensor
    streams: dict[str, Tensor]
    single: bool
    one_pos: bool


@dataclass
class Readout(FrozenNorm):
    """:class:`FrozenNorm` turned into the target's logit.

    ``u [B, P, d]`` is ``a ⊙ W_U[target]`` (centred for LayerNorm): a write ``c`` adds
    ``u · c``. ``bias`` and ``logit`` are ``[B, P]``.
    """

    u: Tensor
    bias: Tensor
    logit: Tensor


def frozen_norm(full: FullCapture, position: Any, adapter: Any = None) -> FrozenNorm:
    """The final norm of ``full`` at ``position`` with its scale frozen (see the module)."""
    if full.residual is None or full.logits is None:
        raise InputError(
            "direct logit attribution needs the residual stream and the logits of one forward: "
            "capture with adapter.capture_full(...) keeping residual= and logits="
        )
    lc = full.logits
    if lc.unembed is None:
        raise InputError(
            "this capture's logits have no unembedding (loaded from disk?); call "
            "full.logits.attach_unembedding(adapter) first"
        )
    if lc.final_normalized is None:
        raise InputError("this capture's logits lack final_normalized; recapture with oculi")
    one_pos, positions = as_positions(position)
    if not positions:
        raise InputError("position must be an int or a non-empty list of ints")
    residual = full.residual
    single = residual.metadata.get("single", True)
    streams = _streams(residual)
    n_b, n_t = streams["embedding"].shape[0], streams["embedding"].shape[1]
    index = real_positions(residual.metadata, None if single else n_b, n_t, positions)
    family = full.metadata.get("family", residual.metadata.get("family"))
    norm_bias, center = _final_norm_bias(family, adapter, lc.final_norm_bias)
    x = _gather(streams["final"], index)
    normed = _gather(_rows(lc.final_normalized, single), index)
    a, b = _frozen_map(x, normed, norm_bias, center)
    return FrozenNorm(index, a, b, center, normed, streams, single, one_pos)


def readout(full: FullCapture, target: Any, position: Any, adapter: Any = None) -> Readout:
    """The frozen final norm and unembedding of ``full`` at ``position`` (see the module)."""
    f = frozen_norm(full, position, adapter)
    assert full.logits is not None and full.logits.unembed is not None  # frozen_norm checked
    w, const = _direction(full.logits.unembed, full.logits.unembed_bias, target)
    w = w.to(f.a.device)
    u = f.a * w
    if f.center:
        u = u - u.mean(-1, keepdim=True)
    bias = (f.b * w).sum(-1) + const.to(f.a.device)  # the frozen map's constant part
    logit = (f.normed * w).sum(-1) + const.to(f.a.device)
    return Readout(**vars(f), u=u, bias=bias, logit=logit)


def dla_full(
    full: FullCapture, target: Any, position: int | Sequence[int] = -1, *, adapter: Any = None
) -> AttributionResult:
    """Exact DLA on a :class:`FullCapture` (see the module docstring)."""
    r = readout(full, target, position, adapter)
    attention = _project(r.streams["attention"], r.index, r.u)  # [B, P, L]
    mlp = _project(r.streams["mlp"], r.index, r.u)
    embedding = (_gather(r.streams["embedding"], r.index) * r.u).sum(-1)
    heads = _heads(full, r.index, r.u, r.single)
    assert full.logits is not None  # readout checked it
    result = _assemble(
        attention, mlp, embedding, r.bias.expand_as(embedding), r.logit, heads, full.logits.softcap
    )
    assert full.residual is not None
    result.layers = tuple(full.residual.layers)
    result.metadata = {"target": target, "position": position, "positions": r.index.tolist()}
    for name in ("values", "embedding", "bias", "attention", "mlp", "heads", "attention_bias"):
        setattr(result, name, _squeeze(getattr(result, name), r.single, r.one_pos))
    result.logit = _squeeze(result.logit, r.single, r.one_pos)
    result.capped_logit = _squeeze(result.capped_logit, r.single, r.one_pos)
    return result


def _heads(full: FullCapture, index: Tensor, u: Tensor, single: bool) -> Tensor | None:
    att = full.attention
    if att is None or att.head_contributions is None:
        return None
    n_model = att.metadata.get("n_layers_model", len(att.layers))
    if tuple(att.layers) != tuple(range(n_model)):
        return None
    contrib = _rows(att.head_contributions, single)  # [B, L, H, T, d]
    return _project(contrib, index, u)  # [B, P, L, H]


def _assemble(attention, mlp, embedding, bias, logit, heads, softcap) -> AttributionResult:
    result = AttributionResult(
        values=attention + mlp,
        embedding=embedding,
        bias=bias,
        attention=attention,
        mlp=mlp,
        heads=heads,
        attention_bias=None if heads is None else attention - heads.sum(-1),
        logit=logit,
    )
    if softcap:
        result.capped_logit = softcap * torch.tanh(logit / softcap)
        result.note = (
            f"this model soft-caps its final logits (cap * tanh(z / cap), cap = {softcap}), "
            "which is not linear in the components: the attribution is of the pre-cap logit z "
            "(.logit); .capped_logit is what the model outputs"
        )
    return result


def dla_residual(
    residual: ResidualCapture,
    unembed: Tensor,
    target: Any,
    position: int = -1,
    *,
    final_norm: Any = None,
) -> AttributionResult:
    """The seed's form: a residual capture and the unembedding matrix, per layer.

    With ``final_norm`` (the model's final norm module, e.g. ``model.model.norm``) the shares
    go through it with its scale frozen, and add up to the model's pre-cap logit (for
    LayerNorm, with its bias in ``.bias``). Without it the last residual is projected on
    ``W_U`` as is, which is not the model's logit (``.note`` says so).
    """
    if not isinstance(residual, ResidualCapture):
        raise InputError(f"expected a ResidualCapture, got {type(residual).__name__}")
    single = residual.metadata.get("single", True)
    streams = _streams(residual)
    n_b, n_t = streams["embedding"].shape[:2]
    index = real_positions(residual.metadata, None if single else n_b, n_t, [position])
    w, const = _direction(unembed.detach(), None, target)
    x = _gather(streams["final"], index)
    w = w.to(x.device)
    note = ""
    if final_norm is not None:
        with torch.no_grad():
            normed = final_norm(x.to(next(final_norm.parameters()).dtype)).double()
        norm_bias = getattr(final_norm, "bias", None)
        a, b = _frozen_map(x, normed, norm_bias, center=norm_bias is not None)
        u = a * w
        if norm_bias is not None:
            u = u - u.mean(-1, keepdim=True)
    else:
        normed, u, b = x, w.expand_as(x), torch.zeros_like(w)
        note = "no final_norm given: the raw residual is projected on W_U (not the model's logit)"
    attention = _project(streams["attention"], index, u)
    mlp = _project(streams["mlp"], index, u)
    embedding = (_gather(streams["embedding"], index) * u).sum(-1)
    bias = ((b * w).sum(-1) + const).expand_as(embedding)
    logit = (normed * w).sum(-1) + const
    result = _assemble(attention, mlp, embedding, bias, logit, None, None)
    result.note, result.layers = note, tuple(residual.layers)
    result.metadata = {"target": target, "position": position, "positions": index.tolist()}
    for name in ("values", "embedding", "bias", "attention", "mlp", "logit"):
        setattr(result, name, _squeeze(getattr(result, name), single, True))
    return result


def direct_logit_attribution(
    capture: Any,
    target: Any,
    *args: Any,
    position: int | Sequence[int] = -1,
    adapter: Any = None,
    final_norm: Any = None,
) -> AttributionResult:
    """Exact direct logit attribution of ``target`` at ``position``.

    Example::

        dla = AttributionMethods.direct_logit_attribution(full, paris_id, position=-1)
        dla.total            # == dla.logit == the model's logit for " Paris"
        AttributionMethods.direct_logit_attribution(full, (paris_id, rome_id))  # difference

    Two call forms:

    * ``(full, target, position=-1)`` on a :class:`FullCapture` with every layer's
      residual and the logits (``adapter.capture_full(ids)``'s defaults; add
      ``CaptureConfig(capture_head_contributions=True)`` for ``.heads``). The final norm's
      per-position scale is frozen from the actual forward (read off the capture), so the
      shares add up to the model's logit; a LayerNorm's bias (GPT-2, GPT-NeoX) is read from
      the capture (``adapter=`` reads it from the model instead).
    * the seed's ``(residual, unembed, target, position)`` on a ``ResidualCapture`` with
      ``W_U [V, d]``; pass ``final_norm=model.model.norm`` to go through the final norm
      (else the raw residual is projected, not the model's logit; ``.note`` says so).

    Args:
        capture: the capture.
        target: a token id, or a pair ``(a, b)`` for the logit difference ``a - b``.
        position: a position counted among real tokens (``-1``: each row's last), or a list
            of them (adds a ``P`` dimension after the batch one).

    Returns:
        :class:`AttributionResult`: ``.values [L]`` (attention + MLP per layer),
        ``.attention``/``.mlp [L]``, ``.heads [L, H]``, ``.attention_bias [L]``,
        ``.embedding``, ``.bias``, ``.logit`` (what they add up to, pre-cap), ``.note``
        (the soft-cap case), each with a leading ``B`` for batches.

    Raises:
        InputError: a capture without every layer's residual or without logits, a target
            outside the vocabulary.
        IndexError: a position outside some row's real tokens.
    """
    if isinstance(capture, FullCapture):
        if args:
            position = args[0]
        if len(args) > 1:
            raise TypeError("direct_logit_attribution(full, target, position=-1, adapter=None)")
        return dla_full(capture, target, position, adapter=adapter)
    if isinstance(capture, ResidualCapture):
        if not isinstance(target, Tensor) or target.dim() != 2 or not args:
            raise InputError(
                "with a ResidualCapture the call is direct_logit_attribution(residual, "
                "unembed [V, d], target_id, position=-1); a FullCapture needs no unembedding"
            )
        pos = args[1] if len(args) > 1 else position
        return dla_residual(capture, target, args[0], pos, final_norm=final_norm)  # type: ignore[arg-type]
    raise InputError(
        "direct_logit_attribution takes a FullCapture (adapter.capture_full(...)) or, in the "
        f"seed's form, a ResidualCapture and the unembedding; got {type(capture).__name__}"
    )


_ = Float  # jaxtyping shapes are on the public wrappers in attribution.py
