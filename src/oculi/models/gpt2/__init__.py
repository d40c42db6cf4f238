"""GPT-2."""

from oculi.models.adapter import Adapter
from oculi.models.gpt2.anatomy import GPT2


class GPT2AttentionAdapter(Adapter):
    """Adapter for GPT-2.

    Example::

        adapter = GPT2AttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    anatomy = GPT2


__all__ = ["GPT2", "GPT2AttentionAdapter"]
