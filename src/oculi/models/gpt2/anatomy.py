"""GPT-2.

Pre-LayerNorm decoder with learned absolute position embeddings (``wpe``, added to the token
embedding before layer 0) and no rotary embedding, so pre- and post-RoPE q/k are the same.
The q, k and v projections are one fused ``c_attn`` whose output is ``[q | k | v]``; every
projection is a ``Conv1D`` whose weight is stored ``[in, out]``. All heads have their own keys
and values (``n_kv_heads == n_heads``). The MLP is plain: ``c_proj(gelu(c_fc(x)))`` with biases.
The attention output projection ``c_proj`` has a bias that belongs to no head.
"""

from oculi.models.anatomy import Anatomy, register_anatomy

GPT2 = register_anatomy(
    Anatomy(
        family="gpt2",
        model_types=("gpt2",),
        decoder="transformer",
        layers="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        attn="attn",
        attn_norm="ln_1",
        mlp_norm="ln_2",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="c_attn",
        o_proj="c_proj",
        rotary=False,
        gate_proj=None,
        up_proj="c_fc",
        down_proj="c_proj",
        conv1d=True,
        unsupported=(
            ("cross-attention (add_cross_attention)", lambda c: c.add_cross_attention),
            (
                "reorder_and_upcast_attn (bypasses the attention interface)",
                lambda c: c.reorder_and_upcast_attn,
            ),
        ),
    )
)
"""GPT-2 (``gpt2``): fused ``c_attn``, ``Conv1D`` weights, learned positions, plain MLP.

::

    GPT2.qkv_proj, GPT2.conv1d   # ("c_attn", True): q_pre/k_pre are slices of c_attn
"""
