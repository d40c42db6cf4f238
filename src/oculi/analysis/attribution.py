"""Attribution: which components and tokens write a prediction.

::

    full = adapter.capture_full(ids, attention=CaptureConfig(capture_head_contributions=True))
    dla = AttributionMethods.direct_logit_attribution(full, target_id, position=-1)
    dla.values, dla.attention, dla.mlp, dla.heads      # [L], [L], [L], [L, H]
    AttributionMethods.neuron_attribution(full, target_id, adapter).values   # [L, d_mlp]
    AttributionMethods.top_attributions(dla, k=5)      # [((layer, head), share), ...]
    AttributionMethods.promoted_tokens(full, (5, 2), k=10)   # [(token_id, Δlogit), ...]
    AttributionMethods.attention_rollout(full)          # .values [L, T, T]
    AttributionMethods.gradient_x_input(adapter, prompt, target_id)   # .values [T]

Direct logit attribution is exact (see :mod:`oculi.analysis.dla`,
:mod:`oculi.analysis.neurons` for MLP neurons and :mod:`oculi.analysis.effects` for the tokens
one component promotes); rollout, flow and value-weighted attention are in
:mod:`oculi.analysis.flow`. Gradient × input is the one method
here that runs the model: one forward from the token embeddings and one backward, no hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import real_positions
from oculi.analysis.dla import direct_logit_attribution
from oculi.analysis.effects import promoted_tokens
from oculi.analysis.flow import attention_flow, attention_rollout, value_weighted_attention
from oculi.analysis.neurons import neuron_attribution
from oculi.analysis.result import AttributionResult
from oculi.capture.interrupts import enable_grad, no_grad
from oculi.capture.structures import ResidualCapture
from oculi.errors import InputError

__all__ = ["AttributionMethods", "AttributionResult"]


def _top(values: Tensor, k: int, by: str, layers: Sequence[int]) -> list[tuple[Any, float]]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if by not in ("abs", "value", "negative"):
        raise ValueError(f"by must be 'abs', 'value' or 'negative', got {by!r}")
    flat = values.reshape(-1)
    key = {"abs": flat.abs(), "value": flat, "negative": -flat}[by]
    key = torch.nan_to_num(key, nan=-float("inf"))
    order = key.topk(min(k, flat.numel())).indices.tolist()
    out: list[tuple[Any, float]] = []
    for i in order:
        idx = list(torch.unravel_index(torch.tensor(i), values.shape))
        layer = layers[int(idx[0])] if layers else int(idx[0])
        where = (layer, *(int(j) for j in idx[1:])) if len(idx) > 1 else layer
        out.append((where, float(flat[i])))
    return out


class AttributionMethods:
    """Pure functions over captures (and weights); see the module docstring.

    ::

        full = adapter.capture_full(prompt, attention=CaptureConfig(capture_head_contributions=True))
        target = adapter.to_single_token(" Paris")
        AttributionMethods.component_attribution(full, target).values    # [L, 2]: attention, MLP
        AttributionMethods.head_attribution(full, target).values         # [L, H]
    """

    attention_rollout = staticmethod(attention_rollout)
    attention_flow = staticmethod(attention_flow)
    value_weighted_attention = staticmethod(value_weighted_attention)
    direct_logit_attribution = staticmethod(direct_logit_attribution)
    neuron_attribution = staticmethod(neuron_attribution)
    promoted_tokens = staticmethod(promoted_tokens)

    @staticmethod
    def component_attribution(
        capture: Any,
        *args: Any,
        position: int = -1,
        adapter: Any = None,
        final_norm: Any = None,
        raw: bool = False,
    ) -> AttributionResult:
        """Attention vs MLP share per layer: ``.values [L, 2]`` (column 0 attention, 1 MLP).

        Example::

            comp = AttributionMethods.component_attribution(full, target_id)
            comp.values[:, 0], comp.values[:, 1]
            comp.total                     # == comp.logit, the model's logit

        Takes ``(full, target, position=-1)``, or the seed's ``(residual, mlp, unembed,
        target)`` (the MLP capture is not needed: the residual stream holds both writes), as
        exact as :func:`direct_logit_attribution` and refused where it would not be.
        """
        if isinstance(capture, ResidualCapture):
            if len(args) < 3:
                raise TypeError("component_attribution(residual, mlp, unembed, target)")
            dla = direct_logit_attribution(
                capture,
                args[1],
                args[2],
                *args[3:4],
                position=position,
                adapter=adapter,
                final_norm=final_norm,
                raw=raw,
            )
        else:
            if not args:
                raise TypeError("component_attribution(full, target, position=-1)")
            dla = direct_logit_attribution(
                capture, args[0], *args[1:2], position=position, adapter=adapter, raw=raw
            )
        assert dla.attention is not None and dla.mlp is not None
        dla.values = torch.stack([dla.attention, dla.mlp], dim=-1)
        return dla

    @staticmethod
    def head_attribution(
        full: Any, target: Any = None, position: int = -1, *, adapter: Any = None, **seed: Any
    ) -> AttributionResult:
        """Each head's direct share of the logit: ``.values [L, H]`` (exact DLA's ``.heads``).

        Needs a FullCapture with ``CaptureConfig(capture_head_contributions=True)``. Seed
        000's form (an attention capture with ``output_weights=`` one ``o_proj`` weight,
        ``unembed_matrix=``, ``target_token_id=``) is refused with the call to make instead:
        one layer's output projection cannot give every layer's heads, and without the
        final norm the shares would not be the model's logit.
        """
        if seed:
            raise InputError(
                f"head_attribution takes (full, target), not {', '.join(k + '=' for k in sorted(seed))}: each "
                "head goes through its own layer's output projection and the frozen final "
                "norm, read from the capture. Use AttributionMethods.head_attribution(full, "
                "target_token_id) on adapter.capture_full(ids, attention=CaptureConfig("
                "capture_head_contributions=True))"
            )
        if target is None:
            raise InputError("head_attribution needs a target token id (or a pair of ids)")
        dla = direct_logit_attribution(full, target, position=position, adapter=adapter)
        if dla.heads is None:
            raise InputError(
                "per-head attribution needs each head's contribution: capture with "
                "adapter.capture_full(..., attention=CaptureConfig(capture_head_contributions=True))"
            )
        dla.values = dla.heads
        return dla

    @staticmethod
    def top_attributions(
        result: AttributionResult | Tensor, k: int = 10, *, by: str = "abs"
    ) -> list[tuple[Any, float]]:
        """The ``k`` largest entries of ``result.values`` (one sequence and position).

        Example::

            AttributionMethods.top_attributions(head_attr, k=3)
            # [((7, 2), 3.1), ((16, 0), -2.4), ((12, 1), 1.9)]

        Args:
            result: an attribution result (or a tensor) whose first dimension is layers.
            k: how many.
            by: ``"abs"`` (largest magnitude, the default), ``"value"`` (most positive) or
                ``"negative"`` (most negative).

        Returns:
            ``[(where, value), ...]``, ``where`` a model layer index for ``[L]`` values, or
            ``(layer, head)`` for ``[L, H]``; best first.
        """
        values = result.values if isinstance(result, AttributionResult) else result
        layers = result.layers if isinstance(result, AttributionResult) else ()
        return _top(values.detach().float().cpu(), k, by, layers)

    @staticmethod
    def gradient_x_input(
        adapter: Any, inputs: Any, target: Any, position: int = -1
    ) -> AttributionResult:
        """Gradient × input of the target logit over the input tokens: ``.values [T]``.

        ``values[j] = ∂logit/∂e_j · e_j``, ``e_j`` token ``j``'s embedding (as the model's
        embedding module returns it), from one forward and one backward. ``target`` may be a
        pair ``(a, b)`` for a logit difference. Batches give ``[B, T]`` (0 at padding).

        Example::

            gxi = AttributionMethods.gradient_x_input(adapter, "The capital of France is", paris)
        """
        from oculi.analysis.readout import _direction
        from oculi.models.anatomy import get_path

        batch = adapter.prepare(inputs)
        w_u, bias, _cap = adapter.unembedding()
        ids = list(target) if isinstance(target, tuple) else [target]
        _direction(w_u, bias, target)  # validates the ids
        embed = get_path(adapter.model, adapter.anatomy.embed)
        with no_grad():
            emb = embed(batch.input_ids)
        emb = emb.detach().requires_grad_(True)
        kwargs = batch.model_kwargs()
        del kwargs["input_ids"]
        with enable_grad():
            logits = adapter.model(inputs_embeds=emb, **kwargs, use_cache=False).logits
            n_b, n_t = batch.input_ids.shape
            meta = {"attention_mask": batch.attention_mask.cpu()}
            index = real_positions(meta, n_b, n_t, [position])[:, 0].to(logits.device)
            rows = logits[torch.arange(n_b, device=logits.device), index]  # [B, V]
            score = rows[:, ids[0]] - (rows[:, ids[1]] if len(ids) == 2 else 0)
            (grad,) = torch.autograd.grad(score.sum(), emb)
        values = (grad * emb.detach()).sum(-1).float() * batch.attention_mask
        return AttributionResult(
            values=values[0] if batch.single else values,
            metadata={"method": "gradient_x_input", "target": target, "position": position},
        )


_ = Float  # shapes are stated in the docstrings; tensors are torch.Tensor
