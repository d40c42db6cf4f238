"""Per-head weight matrices of a model, with the linear parts of its norms folded in.

::

    weights = HeadWeights.from_adapter(adapter)
    weights.w_q.shape      # [L, H, d_model, D]; query head h of layer l reads x @ w_q[l, h]
    weights.ov(3, 1)       # [d_model, d_model]: W_V W_O of head (3, 1)

Row-vector convention throughout (as in Elhage et al. 2021 and TransformerLens): a head's
query is ``x @ W_Q``, its output ``z @ W_O``; ``W_QK = W_Q W_K^T`` and ``W_OV = W_V W_O`` are
``[d_model, d_model]``. Grouped-query attention is expanded: query head ``h`` uses key/value
head ``h // (H / H_kv)``, as Hugging Face's ``repeat_kv`` does, so every tensor here is per
query head.

What is folded, and what is not (a norm is linear once its per-token scale is fixed; the
scale is a positive number per token, which no normalised composition score sees):

* the norm before attention: its gain (``offset + w``) scales the rows of ``W_Q``, ``W_K``
  and ``W_V``; a LayerNorm's centring (``x - mean(x)``) is folded as the projection
  ``I - 11^T/d``; its bias, a constant, is left out;
* per-head q/k norms (Qwen 3, Gemma 3, OLMo 2): their gains scale the columns of ``W_Q`` and
  ``W_K``; the per-token RMS divisor is left out;
* the norm on the attention output (Gemma 2/3, OLMo 2): its gain scales the columns of
  ``W_O``;
* rotary embeddings are left out (they rotate q and k by position; the matrices here are the
  position-free content path, as in the literature); projection biases are left out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from oculi.models.weights import read_bias, read_weight


@dataclass(frozen=True)
class HeadWeights:
    """Per-query-head ``W_Q``, ``W_K``, ``W_V`` ``[L, H, d_model, D]`` and ``W_O`` ``[L, H, D, d_model]``.

    Attributes:
        w_q, w_k, w_v: input projections, norms folded (see the module docstring).
        w_o: output projections, the attention-output norm's gain folded.
        n_kv_heads: key/value heads before the GQA expansion.
    """

    w_q: Float[Tensor, "layer head d_model d_head"]
    w_k: Float[Tensor, "layer head d_model d_head"]
    w_v: Float[Tensor, "layer head d_model d_head"]
    w_o: Float[Tensor, "layer head d_head d_model"]
    n_kv_heads: int

    @property
    def n_layers(self) -> int:
        return int(self.w_q.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.w_q.shape[1])

    @functools.cached_property
    def o_gram(self) -> Float[Tensor, "layer head d_head d_head"]:
        """``W_O W_O^T`` per head (computed once): ``‖z W_O‖² = z (W_O W_O^T) z^T``."""
        return self.w_o @ self.w_o.transpose(-1, -2)

    def qk(self, layer: int, head: int) -> Float[Tensor, "d_model d_model"]:
        """``W_Q W_K^T`` of one head."""
        return self.w_q[layer, head] @ self.w_k[layer, head].T

    def ov(self, layer: int, head: int) -> Float[Tensor, "d_model d_model"]:
        """``W_V W_O`` of one head."""
        return self.w_v[layer, head] @ self.w_o[layer, head]

    @staticmethod
    def from_adapter(adapter: Any, dtype: torch.dtype = torch.float32) -> HeadWeights:
        """Read every layer's attention weights from ``adapter`` (an :class:`oculi.Adapter`)."""
        layers = [_layer(adapter, i, dtype) for i in range(adapter.n_layers)]
        q, k, v, o = (torch.stack([lw[i] for lw in layers]) for i in range(4))
        return HeadWeights(w_q=q, w_k=k, w_v=v, w_o=o, n_kv_heads=adapter.n_kv_heads)


def weights_of(source: Any, adapter: Any = None, *, call: str = "") -> HeadWeights:
    """The :class:`HeadWeights` of ``source``: itself, read from an adapter, or from the
    adapter that made a capture (while it lives; see :func:`~oculi.capture.structures.bound_adapter`).

    ``adapter`` wins when given. ``call`` names the function, for the error's example.

    Raises:
        InputError: a capture that cannot reach its model (loaded from a file, copied, or its
            adapter is gone), naming the ``adapter=`` call; anything else that holds no weights.
    """
    from oculi.capture.structures import Storable, bound_adapter
    from oculi.errors import InputError

    if adapter is not None:
        return weights_of(adapter, call=call)
    if isinstance(source, HeadWeights):
        return source
    if hasattr(source, "anatomy") and hasattr(source, "layer_modules"):
        return HeadWeights.from_adapter(source)
    if isinstance(source, Storable):
        live = bound_adapter(source)
        if live is not None:
            return HeadWeights.from_adapter(live)
        example = f"{call or 'CompositionAnalysis.qk_composition'}(capture, ..., adapter=adapter)"
        raise InputError(
            "this reads the model's weights, which this capture cannot reach (loaded from a "
            f"file, copied, or its adapter is gone): pass the adapter, {example}"
        )
    raise InputError(
        "weight-based analysis needs the model's weights: pass the adapter (oculi.load / "
        f"oculi.attach) or HeadWeights.from_adapter(adapter); got {type(source).__name__}"
    )


def _w(module: nn.Module) -> Tensor:
    return read_weight(module)  # offloaded or quantized weights read as floats


def _in_out(module: nn.Module, conv1d: bool) -> Tensor:
    """A projection's weight as ``[in, out]``."""
    w = _w(module)
    return w if conv1d else w.T


def _qkv(adapter: Any, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """``W_Q [d, H*D]``, ``W_K``/``W_V`` ``[d, H_kv*D]`` of one layer."""
    anat = adapter.anatomy
    attn = f"{anat.attn}."
    h, kv, d = adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    if anat.qkv_proj is None:
        q, k, v = (anat.q_proj, anat.k_proj, anat.v_proj)
        return tuple(_in_out(adapter.part(layer, attn + p), anat.conv1d) for p in (q, k, v))  # type: ignore[return-value]
    fused = _in_out(adapter.part(layer, attn + anat.qkv_proj), anat.conv1d)  # [d_model, out]
    if anat.qkv_layout == "per_head":  # [head, (q k v), d_head]
        per = fused.reshape(fused.shape[0], h, 3, d)
        return tuple(per[:, :, i].reshape(fused.shape[0], h * d) for i in range(3))  # type: ignore[return-value]
    return tuple(fused.split([h * d, kv * d, kv * d], dim=1))  # type: ignore[return-value]


def _gain(adapter: Any, layer: int, path: str | None) -> Tensor | None:
    if path is None:
        return None
    weight = read_bias(adapter.part(layer, path), "weight")  # None: a norm without a gain
    if weight is None:
        return None
    return adapter.anatomy.norm_offset + weight.float()


def _layer(adapter: Any, layer: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    anat = adapter.anatomy
    h, kv, d = adapter.n_heads, adapter.n_kv_heads, adapter.d_head
    q, k, v = (t.to(dtype) for t in _qkv(adapter, layer))
    gain = _gain(adapter, layer, anat.attn_norm)
    if gain is not None:
        q, k, v = (gain.to(dtype)[:, None] * t for t in (q, k, v))
    if (
        anat.attn_norm is not None
        and getattr(adapter.part(layer, anat.attn_norm), "bias", None) is not None
    ):
        q, k, v = (t - t.mean(0, keepdim=True) for t in (q, k, v))  # LayerNorm centring
    for which, path in (("q", anat.q_norm), ("k", anat.k_norm)):
        g = _gain(adapter, layer, f"{anat.attn}.{path}" if path else None)
        if g is None:
            continue
        g = g.to(dtype)
        if which == "q":
            q = q * (g if g.numel() == q.shape[1] else g.repeat(h))
        else:
            k = k * (g if g.numel() == k.shape[1] else g.repeat(kv))
    w_o = _in_out(adapter.part(layer, f"{anat.attn}.{anat.o_proj}"), anat.conv1d).to(dtype)
    out_gain = _gain(adapter, layer, anat.attn_out_norm)
    if out_gain is not None:
        w_o = w_o * out_gain.to(dtype)
    rep = h // kv
    q = q.reshape(-1, h, d).transpose(0, 1)
    k = k.reshape(-1, kv, d).transpose(0, 1).repeat_interleave(rep, 0)
    v = v.reshape(-1, kv, d).transpose(0, 1).repeat_interleave(rep, 0)
    return q, k, v, w_o.reshape(h, d, -1)
