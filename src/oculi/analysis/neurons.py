"""Exact direct logit attribution to MLP neurons: which neurons write a token's logit.

::

    full = adapter.capture_full(ids)                       # residual, MLP and logits
    neurons = AttributionMethods.neuron_attribution(full, target_id, adapter)
    neurons.values                    # [L, d_mlp] each neuron's write into the logit
    AttributionMethods.top_attributions(neurons, k=10)   # [((layer, neuron), share), ...]

A neuron's write is its activation (the input of the MLP's output projection, captured as
``MLPConfig``'s ``post_activation``) times its column of the output projection ``W_out``. It
reaches the logit through the final norm, whose per-position scale is frozen at the value of
the actual forward exactly as in :mod:`oculi.analysis.dla`, so neuron ``n`` of a layer adds
``act_n · (W_out[:, n] · u)``. ``W_outᵀ u`` is computed in the weights' precision (float32
at least, so the 2048 × 640 matrices of Gemma 3 270M are read once, not copied to float64);
everything else in float64. In Gemma 2/3 and OLMo 2 an RMSNorm follows the MLP; its
per-position scale ``(offset + w) / rms(output)`` is frozen the same way, computed from the
captured MLP output and the norm's weight as head contributions do for the norm after
attention (a ratio of what joins the residual to the output would lose precision where the
output is near 0). The output projection's bias belongs to no neuron: it is
``.bias``, so ``values.sum(-1) + bias == mlp``, each layer's MLP share of
:func:`~oculi.analysis.dla.direct_logit_attribution`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from oculi.analysis.readout import _gather, _rows, _squeeze, readout
from oculi.analysis.result import AttributionResult
from oculi.capture.heads import rms_gain
from oculi.capture.structures import FullCapture
from oculi.errors import InputError, LayerIndexError
from oculi.models.weights import read_bias, read_weight


def mlp_config(adapter: Any) -> Any:
    """The least ``MLPConfig`` neuron attribution reads: the activations, and the MLP's output
    where a norm follows the MLP (to freeze that norm's scale)."""
    from oculi.capture import MLPConfig

    normed = adapter.anatomy.mlp_out_norm is not None
    return MLPConfig(capture_gate=False, capture_up=False, capture_output=normed)


def neuron_attribution(
    full: FullCapture,
    target: Any,
    adapter: Any,
    position: int | Sequence[int] = -1,
    *,
    layers: Sequence[int] | None = None,
) -> AttributionResult:
    """Each MLP neuron's exact share of the logit of ``target`` at ``position``.

    Args:
        full: a :class:`FullCapture` of every layer's residual, the logits and the MLP's
            ``post_activation`` (and ``output`` where a norm follows the MLP):
            ``adapter.capture_full(ids)``'s defaults.
        target: a token id, or a pair ``(a, b)`` for the logit difference.
        adapter: the model's adapter, for the output projections' weights.
        position: a position among the real tokens (``-1``: the last) or a list of them.
        layers: the layers to attribute (default: every layer the MLP capture holds).

    Returns:
        ``.values [L, d_mlp]`` (``[P, L, d_mlp]`` for a list of positions, ``[B, ...]`` for a
        batch), ``.bias [L]`` the output projection's bias, ``.mlp [L]`` each layer's whole
        MLP share (``values.sum(-1) + bias``), ``.logit`` and ``.layers``.
    """
    if not isinstance(full, FullCapture):
        raise InputError(f"neuron_attribution takes a FullCapture, got {type(full).__name__}")
    mlp = full.mlp
    if mlp is None or mlp.post_activation is None:
        raise InputError(
            "neuron attribution needs the MLP's post_activation: capture with "
            "adapter.capture_full(ids) keeping mlp=MLPConfig(capture_post_activation=True)"
        )
    anatomy = adapter.anatomy
    if anatomy.mlp_out_norm is not None and mlp.output is None:
        raise InputError(
            f"a {anatomy.family} model normalises the MLP output before the residual; neuron "
            "attribution needs MLPConfig(capture_output=True) to freeze that norm's scale"
        )
    chosen = list(mlp.layers) if layers is None else [int(layer) for layer in layers]
    for layer in chosen:
        if layer not in mlp.layers:
            raise LayerIndexError(
                f"layer {layer} has no MLP capture; this capture holds layers {list(mlp.layers)}"
            )
    r = readout(full, target, position, adapter)
    act_rows = _rows(mlp.post_activation, r.single)  # [B, L, T, d_mlp]
    out_rows = None if mlp.output is None else _rows(mlp.output, r.single)
    values, biases, shares = [], [], []
    for layer in chosen:
        row = mlp.layer_index(layer)
        joined = _gather(r.streams["mlp"][:, layer], r.index)  # what joins the residual
        v = r.u
        if anatomy.mlp_out_norm is not None:  # an RMSNorm: (offset + w) / rms(output)
            assert out_rows is not None  # checked above
            norm = adapter.part(layer, anatomy.mlp_out_norm)
            output = _gather(out_rows[:, row], r.index)
            gain = rms_gain(norm, output, anatomy.norm_offset).detach()
            v = gain.to(r.u.device, torch.float64) * r.u
        weight, bias = _output_projection(adapter, layer)
        # W_outᵀ v in the weight's precision (reading W_out once), the rest in float64
        column = (v.to(weight.device, weight.dtype) @ weight).to(v.device, torch.float64)
        values.append(_gather(act_rows[:, row], r.index) * column)
        biases.append(
            (v * bias.to(v.device)).sum(-1) if bias is not None else torch.zeros_like(v[..., 0])
        )
        shares.append((joined * r.u).sum(-1))

    def out(parts: list[Tensor]) -> Tensor:  # [B, P, L, ...], squeezed as the input was
        squeezed = _squeeze(torch.stack(parts, 2), r.single, r.one_pos)
        assert squeezed is not None
        return squeezed

    return AttributionResult(
        values=out(values),
        bias=out(biases),
        mlp=out(shares),
        logit=_squeeze(r.logit, r.single, r.one_pos),
        layers=tuple(chosen),
        note="neurons' direct writes through the frozen final norm; .bias is W_out's bias",
        metadata={"method": "neurons", "target": target, "positions": r.index.tolist()},
    )


def _output_projection(adapter: Any, layer: int) -> tuple[Tensor, Tensor | None]:
    """``(W_out [d_model, d_mlp], bias [d_model] or None)``, shared with the model (float32
    at least: half-precision weights are widened)."""
    anatomy = adapter.anatomy
    module = adapter.part(layer, f"{anatomy.mlp}.{anatomy.down_proj}")
    weight = read_weight(module)  # offloaded or quantized weights read as floats
    if anatomy.conv1d:  # GPT-2's Conv1D stores [in, out]
        weight = weight.T
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
    bias = read_bias(module)
    return weight, (bias.double() if bias is not None else None)
