"""OLMo 2.

A *post*-norm variant: no norm before attention or the MLP; instead each branch's output is
RMS-normalised before it joins the residual (``x + norm(attn(x))``, ``x + norm(mlp(x))``).
Queries and keys are RMS-normalised over the whole ``H * d_head`` projection (not per head)
before rotary. Otherwise the LLaMA tree (GQA, gated SiLU MLP, ``lm_head``).
"""

from oculi.models.anatomy import Anatomy, register_anatomy

OLMO2 = register_anatomy(
    Anatomy(
        family="olmo2",
        model_types=("olmo2",),
        attn_norm=None,
        attn_out_norm="post_attention_layernorm",
        mlp_norm=None,
        mlp_out_norm="post_feedforward_layernorm",
        q_norm="q_norm",
        k_norm="k_norm",
        qk_norm_layout="flat",
    )
)
"""OLMo 2 (``olmo2``): no pre-attention norm, norms on both branch outputs, q/k norm.

::

    OLMO2.attn_norm             # None: attn_in is the layer input itself
"""
