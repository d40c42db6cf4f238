"""What analyses return: attributions (``.values`` and, for DLA, its exact parts) and
composition results (``.values`` and ``.metadata``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from oculi.errors import InputError


@dataclass
class AttributionResult:
    """An attribution: ``.values`` plus, for direct logit attribution, its parts.

    Attributes:
        values: the attribution (``[L]`` for direct logit attribution: attention + MLP per
            layer; other methods document their own shape).
        embedding: the embedding's share (DLA).
        bias: everything constant: final-norm bias and unembedding bias (DLA).
        attention, mlp: each layer's attention and MLP share ``[L]`` (DLA).
        heads: each head's share ``[L, H]`` (DLA on a capture with head contributions).
        attention_bias: the output projection bias's share per layer ``[L]`` (no head's).
        logit: the logit (or logit difference) the shares add up to, from the capture's own
            final normalised residual; pre-cap where the model soft-caps.
        capped_logit: what the model outputs after its final soft-cap (``None`` without one).
        layers: model layer index of each row of ``values``.
        note: what was attributed, when it is not plainly the logit.
        metadata: method-specific details (target, positions, ...).
    """

    values: Tensor
    embedding: Tensor | None = None
    bias: Tensor | None = None
    attention: Tensor | None = None
    mlp: Tensor | None = None
    heads: Tensor | None = None
    attention_bias: Tensor | None = None
    logit: Tensor | None = None
    capped_logit: Tensor | None = None
    layers: tuple[int, ...] = ()
    note: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str | None:
        """Jupyter's view of a DLA of one sequence and position, as in the report."""
        if self.attention is None or self.mlp is None or self.attention.dim() != 1:
            return None  # other methods and batched results: the plain repr
        from oculi.visualize.views import attribution_view, notebook

        return notebook(attribution_view(self), interactive=True)

    @property
    def total(self) -> Tensor:
        """Every layer's attention and MLP share + ``embedding`` + ``bias``: equals ``logit``
        for an exact DLA (whatever ``values`` holds: layers, ``[L, 2]`` components, heads)."""
        if self.embedding is None or self.bias is None:
            raise InputError(
                "total is defined for direct logit attribution results of every layer only"
            )
        if self.attention is not None and self.mlp is not None:
            return self.attention.sum(-1) + self.mlp.sum(-1) + self.embedding + self.bias
        return self.values.sum(-1) + self.embedding + self.bias


@dataclass
class CompositionResult:
    """A composition analysis: ``.values`` and what they mean in ``.metadata``.

    ::

        result = CompositionAnalysis.virtual_attention(capture, [(0, 3), (2, 1)])
        result.values.shape            # [T, T]
        result.metadata["path_str"]    # "L0H3 -> L2H1": what the values are of
    """

    values: Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
