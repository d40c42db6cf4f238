"""LLaMA (Llama 2/3) and Mistral.

Pre-norm decoder: ``x + attn(rmsnorm(x))``, then ``x + mlp(rmsnorm(x))``. Separate
``q/k/v/o_proj`` with grouped-query attention (``num_key_value_heads`` ≤ ``num_attention_heads``,
each KV head serving ``n_heads / n_kv_heads`` query heads), rotary position embeddings on q and
k, and a gated SiLU MLP ``down(silu(gate(x)) * up(x))``. Mistral is the same tree with a
sliding attention window. The unembedding is ``lm_head`` (tied to the embedding in Llama 3.2).
"""

from oculi.models.anatomy import Anatomy, register_anatomy

LLAMA = register_anatomy(Anatomy(family="llama", model_types=("llama", "mistral")))
"""LLaMA and Mistral (``llama``, ``mistral``): the default anatomy's layout.

::

    LLAMA.model_types           # ("llama", "mistral")
"""
