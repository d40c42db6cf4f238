"""GPT-NeoX and Pythia."""

from oculi.models.adapter import Adapter
from oculi.models.gpt_neox.anatomy import GPT_NEOX


class GPTNeoXAttentionAdapter(Adapter):
    """Adapter for GPT-NeoX and Pythia.

    Example::

        adapter = GPTNeoXAttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    anatomy = GPT_NEOX


__all__ = ["GPT_NEOX", "GPTNeoXAttentionAdapter"]
