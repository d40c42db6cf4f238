"""``oculi.ModelAnalyzer``: seed 002's one-object facade over oculi.

See :mod:`oculi.analyzer.core` for the class (its logit lens in :mod:`oculi.analyzer.lens`,
the figures in :mod:`oculi.analyzer.plots`, path patching and neuron attribution in
:mod:`oculi.analyzer.causal`), :mod:`oculi.analyzer.records` for activation records and their
files, and :mod:`oculi.analyzer.compare` for comparing and summarising them.
"""

from oculi.analyzer.compare import (
    activation_statistics,
    compare_activations,
    get_activation_statistics,
)
from oculi.analyzer.core import ModelAnalyzer
from oculi.analyzer.projection import Projection, project
from oculi.analyzer.records import ActivationRecord, load_records, save_records

__all__ = [
    "ActivationRecord",
    "ModelAnalyzer",
    "Projection",
    "activation_statistics",
    "compare_activations",
    "get_activation_statistics",
    "load_records",
    "project",
    "save_records",
]
