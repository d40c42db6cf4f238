"""TransformerLens compatibility: its entry points and cache on any oculi model.

::

    adapter = oculi.load("gemma-3-270m")
    logits, cache = adapter.run_with_cache("When Mary and John went to the store, John gave")
    cache["pattern", 3]                                     # blocks.3.attn.hook_pattern
    logits = adapter.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_z", fn)])
    logits, cache = adapter.run_with_cache_with_saes(tokens, saes=[sae])  # SAELens' form

Hook names (:mod:`oculi.tl.names`) map onto oculi's sites, hook functions run as oculi
interventions (:mod:`oculi.tl.run`), and :class:`ActivationCache` (:mod:`oculi.tl.cache`) has
TransformerLens's methods with the final norm frozen exactly, so attributions add up to the
model's logit for every family; per-head results are exact also where TransformerLens's are
not (a norm after attention: Gemma 2/3, OLMo 2).
"""

from oculi.tl.cache import ActivationCache, apply_slice
from oculi.tl.names import HookSpec, get_act_name, hook_names
from oculi.tl.run import HookPoint, hooks, run_with_cache, run_with_hooks
from oculi.tl.saes import latent_name, run_with_cache_with_saes, run_with_saes
from oculi.tl.tokens import TLConfig, to_str_tokens, to_string, to_tokens

__all__ = [
    "ActivationCache",
    "HookPoint",
    "HookSpec",
    "TLConfig",
    "apply_slice",
    "get_act_name",
    "hook_names",
    "hooks",
    "latent_name",
    "run_with_cache",
    "run_with_cache_with_saes",
    "run_with_hooks",
    "run_with_saes",
    "to_str_tokens",
    "to_string",
    "to_tokens",
]
