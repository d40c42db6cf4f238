"""Each head's share of the attention output, computed from the output projection's input.

A capture records ``z`` (the output projection's input) and, behind an output norm, the
projection's output; :func:`head_contributions` turns them into ``[B, n, H, T, d_model]``
shares that add up, with the projection bias, to the attention output. :func:`rms_gain` is the
frozen per-position scale of an RMSNorm that makes those shares exact in Gemma 2/3 and OLMo 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from oculi.capture.places import ModelParts


def head_contributions(
    adapter: ModelParts,
    z: torch.Tensor,
    layers: Sequence[int],
    o_out: torch.Tensor | None,
    *,
    alloc: Callable[[tuple[int, ...], torch.Tensor], torch.Tensor] | None = None,
    done: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Each head's contribution to the residual, ``[B, n, H, T, d_model]``.

    Filled a layer at a time into one tensor (``alloc(shape, like)`` makes it, default
    ``like.new_empty``; ``done(i, out[:, i])`` follows each layer: a streamed capture writes
    it to disk).

    ``z`` is the output projection's input ``[B, n, T, H*D]``. Head ``h`` contributes
    ``z_h @ W_O[:, h]^T``; the projection bias belongs to no head. For families that normalise
    the attention output before adding it (Gemma 2/3, OLMo 2), the RMSNorm is linear once its
    per-token scale is fixed, so each head's share is ``z_h W_O,h^T * (offset + w) / rms(o)``
    with ``rms`` taken from the full output ``o`` — the shares then sum to ``attn_out`` exactly.
    """
    anat = adapter.anatomy
    b, n, t, _ = z.shape
    h, d = adapter.n_heads, adapter.d_head
    out: torch.Tensor | None = None  # filled a layer at a time: never two copies at once
    for i, layer in enumerate(layers):
        o_proj = adapter.part(layer, f"{anat.attn}.{anat.o_proj}")
        w = _read_weight(o_proj)  # offloaded or quantized weights read as floats
        w_o = w.T if anat.conv1d else w  # [d_model, H*D]
        w_o = w_o.to(z.device, z.dtype).view(w_o.shape[0], h, d)
        zi = z[:, i].reshape(b, t, h, d)
        contrib = torch.einsum("bthd,mhd->bhtm", zi, w_o)
        if anat.attn_out_norm is not None and o_out is not None:
            norm = adapter.part(layer, anat.attn_out_norm)
            contrib = contrib * rms_gain(norm, o_out[:, i], anat.norm_offset).unsqueeze(1)
        if out is None:
            shape = (b, len(layers), *contrib.shape[1:])
            out = alloc(shape, contrib) if alloc is not None else contrib.new_empty(shape)
        out[:, i] = contrib
        if done is not None:
            done(i, out[:, i])
    assert out is not None, "head_contributions needs at least one layer"
    return out


def rms_gain(norm: nn.Module, x: torch.Tensor, offset: float) -> torch.Tensor:
    """``(offset + weight) / rms(x)`` of an RMSNorm for input ``x [B, T, d]`` -> ``[B, T, d]``."""
    eps: float | None = getattr(norm, "eps", None)
    if eps is None:
        eps = getattr(norm, "variance_epsilon", 1e-6)
    xf = x.float()
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    weight = _read_weight(norm).to(x.device)
    return (inv * (offset + weight.float())).to(x.dtype)


def _read_weight(module: nn.Module) -> torch.Tensor:
    """:func:`oculi.models.weights.read_weight` (imported here: ``oculi.models`` imports the
    capture core, so the capture core reaches it lazily)."""
    from oculi.models.weights import read_weight

    return read_weight(module)
