"""Phi-3."""

from oculi.models.adapter import Adapter
from oculi.models.phi3.anatomy import PHI3


class Phi3AttentionAdapter(Adapter):
    """Adapter for Phi-3.

    Example::

        adapter = Phi3AttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    anatomy = PHI3


__all__ = ["PHI3", "Phi3AttentionAdapter"]
