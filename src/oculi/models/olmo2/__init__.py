"""OLMo 2."""

from oculi.models.adapter import Adapter
from oculi.models.olmo2.anatomy import OLMO2


class Olmo2AttentionAdapter(Adapter):
    """Adapter for OLMo 2.

    Example::

        adapter = Olmo2AttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    anatomy = OLMO2


__all__ = ["OLMO2", "Olmo2AttentionAdapter"]
