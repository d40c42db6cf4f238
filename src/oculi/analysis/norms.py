"""Query, key and value norms: how large each head's vectors are at each position.

::

    q = NormAnalysis.q_norms(capture)     # [L, H, T]
    k = NormAnalysis.k_norms(capture)     # [L, H_kv, T]

The attention logit of query ``q`` and key ``k`` is ``q·k / √d = |q| |k| cos θ / √d``, so at a
fixed angle a longer query sharpens its softmax: query norms are the natural companion of
attention entropy (see :mod:`oculi.analysis.correlation`). Norms are Euclidean over the head
dimension, of the stage the capture holds (``capture.qk_stage``: post-RoPE by default; RoPE is
a rotation, so it leaves them unchanged). Grouped-query models have ``H_kv < H`` key/value
heads, and the key/value norms keep that shape.

Batched captures give a leading ``B``, with ``NaN`` at padded positions.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Float
from torch import Tensor

from oculi.analysis._common import attention_of, field, is_batched, mark_padding


def _norms(capture: Any, name: str) -> Tensor:
    att = attention_of(capture)
    vectors = field(att, name)
    norms = vectors.norm(dim=-1)
    return mark_padding(norms, att.metadata, is_batched(vectors, name))


class NormAnalysis:
    """L2 norms of captured query, key and value vectors; pure functions of a capture.

    ::

        capture = adapter.capture(prompt)
        NormAnalysis.q_norms(capture)      # [L, H, T]
        NormAnalysis.k_norms(capture)      # [L, H_kv, T]
    """

    @staticmethod
    def q_norms(capture: Any) -> Float[Tensor, "*batch layer head pos"]:
        """Norm of each query vector: ``[L, H, T]`` (``[B, L, H, T]`` for batches).

        Raises:
            InputError: the capture holds no queries (``CaptureConfig(capture_queries=True)``).
        """
        return _norms(capture, "queries")

    @staticmethod
    def k_norms(capture: Any) -> Float[Tensor, "*batch layer kv_head pos"]:
        """Norm of each key vector: ``[L, H_kv, T]`` (``[B, L, H_kv, T]`` for batches)."""
        return _norms(capture, "keys")

    @staticmethod
    def v_norms(capture: Any) -> Float[Tensor, "*batch layer kv_head pos"]:
        """Norm of each value vector: ``[L, H_kv, T]`` (``[B, L, H_kv, T]`` for batches)."""
        return _norms(capture, "values")
