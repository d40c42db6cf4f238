"""The LLaMA family (Llama 2/3, Mistral)."""

from oculi.models.adapter import Adapter
from oculi.models.llama.anatomy import LLAMA


class LlamaAttentionAdapter(Adapter):
    """Adapter for LLaMA-family models (Llama 2/3, Mistral).

    Example::

        adapter = LlamaAttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    anatomy = LLAMA


MistralAttentionAdapter = LlamaAttentionAdapter
"""Mistral uses LLaMA's anatomy (the same tree, with a sliding window).

::

    adapter = MistralAttentionAdapter(model, tokenizer)
"""

__all__ = ["LLAMA", "LlamaAttentionAdapter", "MistralAttentionAdapter"]
