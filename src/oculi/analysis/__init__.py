"""Analysis: pure functions over captures.

Nothing here registers a hook. A few functions run the model through public APIs:
:func:`oculi.logit_lens` (the adapter's capture), ``AttributionMethods.gradient_x_input`` (one
forward and backward from the embeddings), ``CircuitDetection.validate`` and ``ioi_heads``
(ablations through the intervention API, path patching through :mod:`oculi.patching`); the
weight-based analyses (``CompositionAnalysis``, ``HeadWeights``) read the model's weights. Every function takes capture structures or
tensors and returns tensors, indexed like the captures: ``[L, H, T]`` per head and position,
``[L, H]`` per head, with row ``i`` for model layer ``capture.layers[i]``.

::

    from oculi.analysis import CircuitDetection, EntropyAnalysis, find_extreme_heads
    entropy = EntropyAnalysis.token_entropy(capture)               # [L, H, T]
    find_extreme_heads(entropy, k=5, mode="min")                     # most focused heads
    CircuitDetection.detect_previous_token_heads(capture)           # [L, H]
"""

from oculi.analysis.attribution import AttributionMethods, AttributionResult
from oculi.analysis.circuits import CircuitDetection
from oculi.analysis.composition import CompositionAnalysis, CompositionResult
from oculi.analysis.correlation import (
    CorrelationAnalysis,
    pearson_pvalue,
    regularized_incomplete_beta,
)
from oculi.analysis.entropy import EntropyAnalysis
from oculi.analysis.logit_lens import LogitLensAnalysis, LogitLensResult, crossover_layer
from oculi.analysis.norms import NormAnalysis
from oculi.analysis.repeats import repeated_random_tokens
from oculi.analysis.stratified import StratifiedView, find_extreme_heads
from oculi.analysis.validation import Task, ValidationResult
from oculi.analysis.weights import HeadWeights

__all__ = [
    "AttributionMethods",
    "AttributionResult",
    "CircuitDetection",
    "CompositionAnalysis",
    "CompositionResult",
    "CorrelationAnalysis",
    "EntropyAnalysis",
    "HeadWeights",
    "LogitLensAnalysis",
    "LogitLensResult",
    "NormAnalysis",
    "StratifiedView",
    "Task",
    "ValidationResult",
    "crossover_layer",
    "find_extreme_heads",
    "pearson_pvalue",
    "regularized_incomplete_beta",
    "repeated_random_tokens",
]
