"""Phi-3.

The LLaMA tree (pre-RMSNorm, GQA, rotary, gated SiLU MLP) with two fusions: ``qkv_proj``
outputs ``[q (H*D) | k (H_kv*D) | v (H_kv*D)]`` and ``gate_up_proj`` outputs ``[gate | up]``.
Long-context variants use ``longrope`` scaling, and rotary may cover only part of each head
(``partial_rotary_factor``).
"""

from oculi.models.anatomy import Anatomy, register_anatomy

PHI3 = register_anatomy(
    Anatomy(
        family="phi3",
        model_types=("phi3",),
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="qkv_proj",
        gate_proj=None,
        up_proj=None,
        gate_up_proj="gate_up_proj",
    )
)
"""Phi-3 (``phi3``): fused ``qkv_proj`` and fused ``[gate | up]`` ``gate_up_proj``.

::

    PHI3.gate_up_proj           # "gate_up_proj": mlp_gate/mlp_up are its two halves
"""
