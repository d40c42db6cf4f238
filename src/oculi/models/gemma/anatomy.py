"""Gemma, Gemma 2 and Gemma 3 (text).

Gemma: the LLaMA tree with three differences. The embedding is multiplied by
``sqrt(hidden_size)`` (inside the embedding module in transformers, so oculi's ``resid_pre`` of
layer 0 is the scaled embedding); RMSNorm multiplies by ``1 + weight`` rather than ``weight``;
the MLP is gated GELU (tanh approximation). The unembedding is tied to the embedding.

Gemma 2 adds a norm on each branch's *output* before it joins the residual
(``post_attention_layernorm``, ``post_feedforward_layernorm``), so the pre-MLP norm is
``pre_feedforward_layernorm``. Attention logits are soft-capped
(``cap * tanh(scores / cap)``), so are the final logits (``final_logit_softcapping``), and
every other layer attends within a sliding window. The query scale is
``query_pre_attn_scalar ** -0.5``, not ``d_head ** -0.5``.

Gemma 3 keeps Gemma 2's sandwich norms and sliding windows (five local layers per global
one, each kind with its own rotary base), drops attention soft-capping in favour of per-head
q/k RMSNorm (applied to ``[B, H, T, D]``), and for the 270M model has 18 layers, 4 query
heads sharing 1 KV head, ``d_head`` 256 and a 262,144-token vocabulary.
"""

from typing import Any

from oculi.models.anatomy import Anatomy, register_anatomy

GEMMA = register_anatomy(Anatomy(family="gemma", model_types=("gemma",), norm_offset=1.0))
"""Gemma (``model_type`` ``gemma``): the LLaMA tree with ``1 + w`` RMSNorm.

::

    GEMMA.norm_offset      # 1.0: RMSNorm multiplies by 1 + weight
"""

_SANDWICH: dict[str, Any] = dict(
    attn_out_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
    norm_offset=1.0,
    final_softcap_attr="final_logit_softcapping",
)

GEMMA2 = register_anatomy(Anatomy(family="gemma2", model_types=("gemma2",), **_SANDWICH))
"""Gemma 2 (``gemma2``): a norm on each branch's output, soft-capping, sliding windows.

::

    GEMMA2.attn_out_norm   # "post_attention_layernorm": attn_out is read at its output
"""
GEMMA3 = register_anatomy(
    Anatomy(
        family="gemma3",
        model_types=("gemma3_text",),
        q_norm="q_norm",
        k_norm="k_norm",
        qk_norm_layout="bhtd",
        **_SANDWICH,
    )
)
"""Gemma 3 text (``gemma3_text``): Gemma 2's sandwich norms plus per-head q/k RMSNorm.

::

    GEMMA3.q_norm, GEMMA3.qk_norm_layout   # ("q_norm", "bhtd"): q_pre is [B, H, T, D]
"""
