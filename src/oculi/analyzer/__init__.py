"""``oculi.ModelAnalyzer``: seed 002's one-object facade over oculi.

See :mod:`oculi.analyzer.core` for the class and :mod:`oculi.analyzer.records` for activation
records and their files.
"""

from oculi.analyzer.core import ModelAnalyzer
from oculi.analyzer.projection import Projection, project
from oculi.analyzer.records import ActivationRecord, load_records, save_records

__all__ = [
    "ActivationRecord",
    "ModelAnalyzer",
    "Projection",
    "load_records",
    "project",
    "save_records",
]
