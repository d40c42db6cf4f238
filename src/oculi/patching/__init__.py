"""Causal methods: activation patching, path patching, causal tracing, attribution patching.

See :mod:`oculi.patching.activation` for what activation patching measures and how sweeps stay
fast.

::

    from oculi import patching

    metric = patching.logit_diff(" Mary", " John")
    result = patching.activation_patching(adapter, clean, corrupt, site="resid_pre",
                                          metric=metric)
    result.values.shape        # [L, T]: one patched run per layer and position
"""

from oculi.patching._common import choose_strategy
from oculi.patching.activation import PatchingResult, activation_patching
from oculi.patching.attribution import attribution_patching
from oculi.patching.metrics import (
    Metric,
    kl_divergence,
    log_prob,
    logit,
    logit_diff,
    probability,
)
from oculi.patching.path import path_patching
from oculi.patching.tracing import TracingResult, causal_tracing, subject_positions

__all__ = [
    "Metric",
    "PatchingResult",
    "TracingResult",
    "activation_patching",
    "attribution_patching",
    "causal_tracing",
    "choose_strategy",
    "kl_divergence",
    "log_prob",
    "logit",
    "logit_diff",
    "path_patching",
    "probability",
    "subject_positions",
]
