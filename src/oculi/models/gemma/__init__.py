"""The Gemma family (Gemma, Gemma 2, Gemma 3 text)."""

from oculi.models.adapter import Adapter
from oculi.models.gemma.anatomy import GEMMA, GEMMA2, GEMMA3


class GemmaAttentionAdapter(Adapter):
    """Adapter for Gemma, Gemma 2 and Gemma 3; the anatomy is picked from ``config.model_type``.

    Example::

        adapter = GemmaAttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    families = ("gemma", "gemma2", "gemma3")


__all__ = ["GEMMA", "GEMMA2", "GEMMA3", "GemmaAttentionAdapter"]
