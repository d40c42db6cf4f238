"""The Qwen family (Qwen 2, 2.5, 3)."""

from oculi.models.adapter import Adapter
from oculi.models.qwen.anatomy import QWEN2, QWEN3


class QwenAttentionAdapter(Adapter):
    """Adapter for Qwen 2, 2.5 and 3; the anatomy is picked from ``config.model_type``.

    Example::

        adapter = QwenAttentionAdapter(model, tokenizer)
        capture = adapter.capture(input_ids)
    """

    families = ("qwen2", "qwen3")


__all__ = ["QWEN2", "QWEN3", "QwenAttentionAdapter"]
