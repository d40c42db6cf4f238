"""GPT-NeoX and Pythia.

Pre-LayerNorm with *parallel* attention and MLP when ``use_parallel_residual`` (the Pythia
default): both branches read the same layer input and the layer returns
``x + attn(ln1(x)) + mlp(ln2(x))``, so there is no residual "between" them; oculi defines
``resid_mid`` as ``x + attn_out`` there. The fused ``query_key_value`` projection is laid out
per head (``[head, (q, k, v), d_head]``). Rotary embeddings cover only the first
``rotary_pct`` of each head's dimensions. The MLP is plain GELU with biases, and the
unembedding is ``lm_head`` (``embed_out`` before transformers 5).
"""

from oculi.models.anatomy import Anatomy, register_anatomy

GPT_NEOX = register_anatomy(
    Anatomy(
        family="gpt_neox",
        model_types=("gpt_neox",),
        decoder="gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        mlp_norm="post_attention_layernorm",
        parallel_attn="use_parallel_residual",
        q_proj=None,
        k_proj=None,
        v_proj=None,
        qkv_proj="query_key_value",
        qkv_layout="per_head",
        o_proj="dense",
        gate_proj=None,
        up_proj="dense_h_to_4h",
        down_proj="dense_4h_to_h",
    )
)
"""GPT-NeoX and Pythia (``gpt_neox``): parallel attention and MLP, fused per-head QKV.

::

    GPT_NEOX.qkv_layout         # "per_head": query_key_value is [head, (q k v), d_head]
"""
