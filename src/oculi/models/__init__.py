"""Models: architecture anatomies, the registry, adapters and loading."""

from oculi.models.adapter import Adapter, attach
from oculi.models.anatomy import Anatomy, anatomy_for, register_anatomy, supported_model_types
from oculi.models.loading import load

__all__ = [
    "Adapter",
    "Anatomy",
    "anatomy_for",
    "attach",
    "load",
    "register_anatomy",
    "supported_model_types",
]
