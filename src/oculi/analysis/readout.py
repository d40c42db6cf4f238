"""The final norm and the unembedding of a capture, frozen: what direct logit attribution reads.

::

    f = frozen_norm(full, position=-1)              # or a ResidualCapture, or adapter=
    f.a                 # [B, P, d]: a residual write c reaches the unembedding as a ⊙ c
    r = readout(full, paris_id, position=-1)
    r.u                 # [B, P, d]: a write c adds u · c to the logit of " Paris"
    r.logit             # [B, P]: the model's (pre-cap) logit, what the shares add up to

The residual entering the final norm is a sum: the embedding, then each layer's attention and
MLP outputs. The final norm is not linear (it divides by the residual's RMS or standard
deviation), but once its per-position scale is frozen at the value the actual forward used, it
is: ``norm(x) = a ⊙ x`` for RMSNorm and ``a ⊙ (x - mean(x)) + b`` for LayerNorm, with ``a`` per
position and dimension. ``a`` is read as the ratio of the model's final normalised residual to
the residual entering the norm (the last layer's ``post_mlp``), so ``a ⊙ x`` reproduces the
model's normalised residual to float64 rounding and the shares add up to the model's logit.

Where the model's normalised residual comes from, first found first:

1. ``full.logits.final_normalized`` (a :class:`FullCapture` with logits);
2. ``residual.final_normalized``, which every residual capture holding the last layer records
   (with the final LayerNorm's bias, ``final_norm_bias``): the seed's
   ``(residual, unembed, target)`` form is exact from the capture alone;
3. the model's final norm applied to the captured residual: ``final_norm=model.model.norm``
   or ``adapter=``.

A capture without any of these (saved by an older oculi, or holding only some layers) is
refused with the call to make, unless ``raw=True`` asks for the raw residual projected on
``W_U`` by name (not the model's logit; the result says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor, nn

from oculi.analysis._common import as_positions, real_positions
from oculi.capture.interrupts import no_grad
from oculi.capture.structures import FullCapture, ResidualCapture
from oculi.errors import InputError
from oculi.models.weights import execution_device, norm_centers, read_bias

# captures saved before oculi recorded ``final_norm_centers`` in their metadata: the built-in
# families whose final norm is a LayerNorm (what those captures could have come from)
_LEGACY_LAYERNORM_FAMILIES = frozenset({"gpt2", "gpt_neox"})

UNKNOWN_NORM = (
    "direct logit attribution goes through the model's final norm, whose per-position scale "
    "this ResidualCapture does not record (saved by an older oculi?). Pass the model: "
    "direct_logit_attribution(residual, unembed, target, adapter=adapter) (or final_norm="
    "model.model.norm), or recapture with adapter.capture_residual(ids), which records it; "
    "raw=True projects the raw residual on W_U instead (not the model's logit)"
)


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


def _squeeze(t: Tensor | None, single: bool, one_pos: bool) -> Tensor | None:
    if t is None:
        return None
    if one_pos:
        t = t[:, 0]
    return t[0] if single else t


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor [B, ..., T, d]`` at ``index [B, P]`` -> ``[B, ..., P, d]`` in float64."""
    b = torch.arange(tensor.shape[0])
    moved = tensor.movedim(-2, 1)  # [B, T, ..., d]
    return moved[b[:, None], index.to(moved.device)].movedim(1, -2).double()


class LayerWrites:
    """Each layer's write to the residual ``[B, L, T, d]``, computed a layer at a time.

    ``w[:, layer]`` is ``a[:, layer] - b[:, layer]`` (``a - (b + c)`` with a third part, as
    the stream of a capture without the branch outputs telescopes), in float32 at least, so a
    long context's residual (memory-mapped from a capture folder) is never copied whole: an
    analysis reads the layers and positions it needs. ``shape``/``device``/``dtype`` are
    those of the result.
    """

    def __init__(self, a: Tensor, b: Tensor | None = None, c: Tensor | None = None) -> None:
        self.parts = (a, b, c)
        self.shape = a.shape
        self.device = a.device
        self.dtype = _wide(a).dtype if a.dtype in _HALF else a.dtype

    def __getitem__(self, key: Any) -> Tensor:
        a, b, c = self.parts
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)):
            raise TypeError("LayerWrites is read one layer at a time: writes[:, layer]")
        layer = key[1]
        out = _wide(a[:, layer])
        if b is not None:
            sub = _wide(b[:, layer]) if c is None else _wide(b[:, layer]) + _wide(c[:, layer])
            out = out - sub
        return out


_HALF = (torch.float16, torch.bfloat16)


def _wide(t: Tensor) -> Tensor:
    # differences of half-precision values are exact in float32 (not in half): the shares
    # then still telescope to the final residual
    return t.float() if t.dtype in _HALF else t


class Streams(TypedDict):
    """The residual's parts: ``attention``/``mlp`` ``[B, L, T, d]`` (each layer's write, read
    a layer at a time: :class:`LayerWrites`), ``embedding`` and ``final`` ``[B, T, d]``
    (``None`` unless every layer is held)."""

    embedding: Tensor | None
    attention: LayerWrites
    mlp: LayerWrites
    final: Tensor | None


def _streams(residual: ResidualCapture, *, complete: bool = True) -> Streams:
    """``attention``/``mlp`` ``[B, L, T, d]``, and with every layer held ``embedding`` and
    ``final`` ``[B, T, d]`` (else ``None``; refused unless ``complete=False``)."""
    single = residual.metadata.get("single", True)
    n_model = residual.metadata.get("n_layers_model", len(residual.layers))
    every = tuple(residual.layers) == tuple(range(n_model))
    if complete and not every:
        raise InputError(
            f"direct logit attribution needs every layer's residual (0..{n_model - 1}) to add "
            f"up to the logit; this capture holds layers {list(residual.layers)}. Capture them "
            "all: direct_logit_attribution(adapter.capture_residual(ids), unembed, target) "
            "(ResidualConfig() holds every layer) or direct_logit_attribution("
            "adapter.capture_full(ids), target); raw=True projects the layers held on W_U as "
            "they are (no total)"
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
    if attn is None:
        assert mid is not None
        attention = LayerWrites(mid, pre)
    else:
        attention = LayerWrites(attn)
    if mlp is not None:
        writes = LayerWrites(mlp)
    elif mid is not None:
        writes = LayerWrites(post, mid)
    else:
        assert attn is not None
        writes = LayerWrites(post, pre, attn)
    return {
        "embedding": _wide(pre[:, 0]) if every else None,
        "attention": attention,
        "mlp": writes,
        "final": _wide(post[:, -1]) if every else None,
    }


def _parts(capture: Any) -> tuple[ResidualCapture, Any]:
    """``(residual capture, logit capture or None)`` of a Full- or ResidualCapture."""
    if isinstance(capture, ResidualCapture):
        return capture, None
    if isinstance(capture, FullCapture):
        if capture.residual is None:
            raise InputError(
                "direct logit attribution needs the residual stream: capture with "
                "adapter.capture_full(...) keeping residual= (ResidualConfig())"
            )
        return capture.residual, capture.logits
    raise InputError(
        "direct logit attribution takes a FullCapture (adapter.capture_full(...)) or a "
        f"ResidualCapture (adapter.capture_residual(...)); got {type(capture).__name__}"
    )


def _unembedding(
    residual: ResidualCapture, logits: Any, adapter: Any, unembed: Any
) -> tuple[Tensor, Tensor | None, float | None]:
    """``(W_U [V, d], its bias, the final soft-cap)`` from the first source that has them."""
    if adapter is not None:
        model_w, model_bias, model_cap = adapter.unembedding()
    if unembed is not None:
        module = isinstance(unembed, nn.Module)
        weight = read_bias(unembed, "weight") if module else unembed
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise InputError(
                "unembed must be the unembedding matrix W_U [V, d_model] (model.lm_head.weight) "
                f"or the module holding it, got {type(unembed).__name__}"
            )
        bias = read_bias(unembed) if module else None
        if bias is None and residual.metadata.get("unembed_bias"):
            raise InputError(
                "this model's unembedding adds a bias, which a bare W_U does not carry: pass "
                "the module (unembed=model.lm_head) or use direct_logit_attribution("
                "adapter.capture_full(ids), target)"
            )
        if logits is not None:
            cap = logits.softcap
        elif "final_softcap" in residual.metadata:
            cap = residual.metadata["final_softcap"]
        else:
            cap = model_cap if adapter is not None else None
        return weight.detach(), None if bias is None else bias.detach(), cap
    if logits is not None and logits.unembed is not None:
        return logits.unembed, logits.unembed_bias, logits.softcap
    if adapter is not None:
        return model_w, model_bias, model_cap
    raise InputError(
        "this capture holds no unembedding (loaded from disk, or captured without logits): "
        "pass adapter=, or call full.logits.attach_unembedding(adapter) first"
    )


def _model_norm(
    residual: ResidualCapture, logits: Any, x: Tensor, index: Tensor, adapter: Any, module: Any
) -> tuple[Tensor, Tensor | None, bool]:
    """``(the model's normalised residual [B, P, d], the norm's bias or None, centred)``."""
    single = residual.metadata.get("single", True)
    family = residual.metadata.get("family")
    center = residual.metadata.get("final_norm_centers")  # recorded at capture time
    if center is None:  # an older capture: the model's norm, else the family's name
        norm = module
        if norm is None and adapter is not None:
            norm = adapter.module(adapter.anatomy.final_norm)
        if norm is not None:
            center = norm_centers(norm, x.shape[-1])
        else:
            center = family in _LEGACY_LAYERNORM_FAMILIES
    if logits is not None and logits.final_normalized is not None:
        bias = adapter.final_norm_bias() if adapter is not None else logits.final_norm_bias
        bias = residual.final_norm_bias if bias is None else bias
        if center and bias is None:
            raise InputError(
                f"the final norm of a {family} model is a LayerNorm whose bias this capture "
                "does not hold (loaded from disk?); call full.logits.attach_unembedding("
                "adapter) or pass adapter="
            )
        return _gather(_rows(logits.final_normalized, single), index), bias, center
    if residual.final_normalized is not None:
        normed = _gather(_rows(residual.final_normalized, single), index)
        return normed, residual.final_norm_bias, center
    if module is None and adapter is not None:
        module = adapter.module(adapter.anatomy.final_norm)
    if module is None:
        raise InputError(UNKNOWN_NORM)
    param = next(module.parameters(), None)
    dtype = x.dtype if param is None else param.dtype
    with no_grad():  # where the norm runs (its offloaded weights are loaded there)
        normed = module(x.to(execution_device(module), dtype))
    bias = read_bias(module)
    return normed.double().to(x.device), bias, center


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


# -- the frozen final norm ------------------------------------------------------------------
@dataclass
class FrozenNorm:
    """The final norm of a capture frozen at the positions asked for, and the unembedding.

    A residual write ``c [B, P, d]`` at those positions reaches the unembedding as
    ``a ⊙ (c - mean(c))`` (``center``, LayerNorm) or ``a ⊙ c`` (RMSNorm); ``b [d]`` is the
    constant the norm adds. ``index [B, P]`` holds the tensor columns of the positions,
    ``normed [B, P, d]`` the model's normalised residual there (``None`` for a raw readout of
    some layers). ``streams`` are the residual's parts (:func:`_streams`); ``unembed [V, d]``,
    ``unembed_bias`` and ``softcap`` the model's unembedding; ``raw``: the norm was left out
    (``a = 1``) because the caller asked for it.
    """

    index: Tensor
    a: Tensor
    b: Tensor
    center: bool
    normed: Tensor | None
    streams: Streams
    single: bool
    one_pos: bool
    unembed: Tensor
    unembed_bias: Tensor | None
    softcap: float | None
    raw: bool = False


@dataclass
class Readout(FrozenNorm):
    """:class:`FrozenNorm` turned into the target's logit.

    ``u [B, P, d]`` is ``a ⊙ W_U[target]`` (centred for LayerNorm): a write ``c`` adds
    ``u · c``. ``bias`` and ``logit`` are ``[B, P]`` (``logit`` ``None`` for a raw readout
    of some layers).
    """

    u: Tensor = None  # type: ignore[assignment]  # always given by readout()
    bias: Tensor = None  # type: ignore[assignment]
    logit: Tensor | None = None


def frozen_norm(
    capture: Any,
    position: Any = -1,
    adapter: Any = None,
    *,
    unembed: Any = None,
    final_norm: Any = None,
    raw: bool = False,
) -> FrozenNorm:
    """The final norm of ``capture`` at ``position`` with its scale frozen (module docstring).

    Example::

        f = frozen_norm(adapter.capture_residual(ids), position=-1)
        f.a[0, 0] * residual_write          # what a write reaches the unembedding as

    Args:
        capture: a :class:`FullCapture` or a :class:`ResidualCapture` of every layer.
        position: a position among real tokens (``-1`` each row's last) or a list of them.
        adapter: the model, for a capture that lacks the norm or the unembedding.
        unembed: ``W_U [V, d]`` (or the module holding it), overriding the capture's.
        final_norm: the model's final norm module, for a capture that lacks the norm.
        raw: leave the norm out (``a = 1``): the raw residual on ``W_U``, not the logit.

    Raises:
        InputError: what the readout needs and the capture lacks, with the call to make.
        IndexError: a position outside some row's real tokens.
    """
    residual, logits = _parts(capture)
    one_pos, positions = as_positions(position)
    if not positions:
        raise InputError("position must be an int or a non-empty list of ints")
    single = residual.metadata.get("single", True)
    streams = _streams(residual, complete=not raw)
    attention = streams["attention"]
    n_b, n_t = attention.shape[0], attention.shape[-2]
    index = real_positions(residual.metadata, None if single else n_b, n_t, positions)
    w_u, w_u_bias, softcap = _unembedding(residual, logits, adapter, unembed)
    if w_u.shape[1] != attention.shape[-1]:
        raise InputError(
            f"unembedding is [{w_u.shape[0]}, {w_u.shape[1]}] but the residual has d_model="
            f"{attention.shape[-1]}: pass the W_U [V, d_model] of the model that was captured"
        )
    final = streams["final"]
    if raw:
        a = torch.ones((*index.shape, w_u.shape[1]), dtype=torch.float64, device=attention.device)
        b, center = torch.zeros_like(a[0, 0]), False
        normed = None if final is None else _gather(final, index)
    else:
        assert final is not None  # complete streams
        x = _gather(final, index)
        normed, norm_bias, center = _model_norm(residual, logits, x, index, adapter, final_norm)
        a, b = _frozen_map(x, normed, norm_bias, center)
    return FrozenNorm(
        index, a, b, center, normed, streams, single, one_pos, w_u, w_u_bias, softcap, raw
    )


def readout(
    capture: Any, target: Any, position: Any = -1, adapter: Any = None, **how: Any
) -> Readout:
    """:func:`frozen_norm` and the target's row of ``W_U``: ``u``, ``bias`` and ``logit``.

    ``target`` is a token id or a pair ``(a, b)`` (the logit difference ``a - b``); ``how``
    takes :func:`frozen_norm`'s keywords (``unembed=``, ``final_norm=``, ``raw=``).

    ::

        r = readout(full, adapter.to_single_token(" Paris"), adapter=adapter)
        r.u.shape          # [B, P, d_model]: a write c into the last residual adds r.u · c
        r.logit            # [B, P], the model's logit for the target
    """
    f = frozen_norm(capture, position, adapter, **how)
    w, const = _direction(f.unembed, f.unembed_bias, target)
    w, const = w.to(f.a.device), const.to(f.a.device)
    u = f.a * w
    if f.center:
        u = u - u.mean(-1, keepdim=True)
    bias = ((f.b * w).sum(-1) + const).expand(f.index.shape)  # the frozen map's constant part
    logit = None if f.normed is None else (f.normed * w).sum(-1) + const
    return Readout(**vars(f), u=u, bias=bias, logit=logit)
