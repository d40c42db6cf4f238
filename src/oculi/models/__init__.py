"""Models: architecture anatomies, the registry, adapters and loading."""

from oculi.models.adapter import Adapter, attach
from oculi.models.anatomy import Anatomy, anatomy_for, register_anatomy, supported_model_types
from oculi.models.loading import load
from oculi.models.weights import execution_device, read_bias, read_weight

__all__ = [
    "Adapter",
    "Anatomy",
    "anatomy_for",
    "attach",
    "execution_device",
    "load",
    "read_bias",
    "read_weight",
    "register_anatomy",
    "supported_model_types",
]
