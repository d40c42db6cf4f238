"""Qwen 2 / 2.5 and Qwen 3.

The LLaMA tree (pre-norm, GQA, rotary, gated SiLU MLP). Qwen 2/2.5 add biases on the q, k and v
projections and may use a sliding window on some layers. Qwen 3 drops the q/k/v biases and
instead normalises each head's query and key (RMSNorm over ``d_head``, applied to the
``[B, T, H, D]`` projection before rotary); oculi's pre-RoPE queries/keys are those normalised
vectors.
"""

from oculi.models.anatomy import Anatomy, register_anatomy

QWEN2 = register_anatomy(Anatomy(family="qwen2", model_types=("qwen2",)))
"""Qwen 2 (``qwen2``): the LLaMA layout with biases on q/k/v.

::

    QWEN2.q_norm                # None (Qwen 3 adds per-head q/k norms)
"""
QWEN3 = register_anatomy(
    Anatomy(
        family="qwen3",
        model_types=("qwen3",),
        q_norm="q_norm",
        k_norm="k_norm",
        qk_norm_layout="bthd",
    )
)
"""Qwen 3 (``qwen3``): per-head q/k RMSNorm before rotary.

::

    QWEN3.q_norm                # "q_norm": q_pre is read at its output, [B, H, T, D]
"""
