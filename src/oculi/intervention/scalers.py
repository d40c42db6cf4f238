"""Q/K scaling (the Spectra method): sharpen or flatten one head's attention.

::

    with InterventionContext(adapter, [SpectraScaler(layer=5, head=2, alpha=1.5)]):
        adapter.generate("The capital of France is", max_new_tokens=10)

A head's attention logits are ``q·k * scaling``; multiplying them by ``alpha`` turns its
pattern into ``softmax(alpha * scores + mask)``: ``alpha > 1`` sharpens (lower entropy),
``alpha < 1`` flattens, ``alpha = 0`` is uniform over the visible keys. The scale is applied
to the head's post-RoPE *query*, never its key: with grouped-query attention a key is shared
by a group of query heads, and scaling it would change all of them. For families with
attention soft-capping (Gemma 2) the scaled logits then pass through the cap
``cap * tanh(alpha * scores / cap)``, as the model's own logits do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from oculi.intervention.base import Binding, Intervention, check_number
from oculi.intervention.patch import SiteWrite

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


class SpectraScaler(Intervention):
    """Scale head ``head``'s attention logits at ``layer`` by ``alpha`` (via its queries).

    Args:
        layer: layer index (negatives count from the end).
        head: query head index.
        alpha: the factor, ``≥ 0``. ``alpha == 1`` installs nothing (an exact no-op).

    Raises:
        ValueError: a negative or non-finite alpha; a head out of range, or an alpha beyond
            the model dtype's range (on binding).

    A forward in which the scaled scores overflow (inf or NaN) raises
    :class:`~oculi.errors.NonFiniteError` naming the scaler.
        IndexError: a layer out of range (on binding).

    Example::

        with InterventionContext(adapter, [SpectraScaler(layer=5, head=2, alpha=1.5)]):  # sharpen
            capture = adapter.capture(prompt)      # patterns [L, H, T, T] of the scaled model
    """

    def __init__(self, layer: int, head: int, alpha: float) -> None:
        alpha = check_number(alpha, "alpha", "SpectraScaler")
        if alpha < 0:
            raise ValueError(
                f"SpectraScaler: alpha must be ≥ 0 (alpha > 1 sharpens, alpha < 1 flattens, "
                f"0 is uniform), got {alpha}"
            )
        self.layer, self.head, self.alpha = layer, head, alpha

    def _repr_fields(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "alpha": self.alpha}

    def bind(self, adapter: Adapter) -> Binding:
        top = torch.finfo(adapter.dtype).max
        if self.alpha > top:
            raise ValueError(
                f"{self!r}: alpha={self.alpha:g} exceeds the largest {adapter.dtype} value "
                f"({top:g}), so the scaled queries would be inf; alpha far above 1 already "
                "makes the head attend to its top key alone"
            )
        write = SiteWrite(
            adapter, "q", self.layer, self.alpha, mode="mul", head=self.head, owner=self
        )
        if self.alpha == 1.0:
            # Installing nothing keeps the model's own attention kernel: routing through the
            # bridge would already change the last bits of sdpa's output.
            return Binding(edits=[], noop="alpha=1 leaves the logits unchanged")
        return Binding(edits=[write.edit()], begins=[write.begin])
