"""oculi: mechanistic interpretability for Hugging Face decoder language models.

::

    import oculi
    adapter = oculi.load()                       # Gemma 3 270M, embedded and cached
    full = adapter.capture_full("The Eiffel Tower is located in the city of")
    full.logits.top_k_indices[:, -1, 0]          # each layer's top prediction

The names below are imported on first use (PEP 562), so ``import oculi`` and the ``oculi``
command's ``--help`` stay fast: torch and transformers load only when a name needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (a submodule itself when the name is the module)
_EXPORTS: dict[str, str] = {
    "intervention": "oculi.intervention",
    "patching": "oculi.patching",
    "probe": "oculi.probe",
    "sae": "oculi.sae",
    "logit_lens": "oculi.analysis.logit_lens",
    "AttentionCapture": "oculi.capture",
    "CaptureConfig": "oculi.capture",
    "FullCapture": "oculi.capture",
    "LogitCapture": "oculi.capture",
    "LogitConfig": "oculi.capture",
    "MLPCapture": "oculi.capture",
    "MLPConfig": "oculi.capture",
    "ResidualCapture": "oculi.capture",
    "ResidualConfig": "oculi.capture",
    "load_capture": "oculi.capture.io",
    "InputError": "oculi.errors",
    "LayerIndexError": "oculi.errors",
    "NonFiniteError": "oculi.errors",
    "NonFiniteWarning": "oculi.errors",
    "StorageRangeWarning": "oculi.errors",
    "OculiError": "oculi.errors",
    "UnknownSiteError": "oculi.errors",
    "UnsupportedArchitectureError": "oculi.errors",
    "Adapter": "oculi.models",
    "Anatomy": "oculi.models",
    "attach": "oculi.models",
    "load": "oculi.models",
    "register_anatomy": "oculi.models",
    "supported_model_types": "oculi.models",
    "activation_patching": "oculi.patching",
    "attribution_patching": "oculi.patching",
    "causal_tracing": "oculi.patching",
    "path_patching": "oculi.patching",
    "harvest": "oculi.harvest",
    "open_harvest": "oculi.harvest",
    "ModelAnalyzer": "oculi.analyzer",
}

if TYPE_CHECKING:  # static checkers and IDEs see the real imports
    from oculi import intervention as intervention
    from oculi import patching as patching
    from oculi import probe as probe
    from oculi import sae as sae
    from oculi.analysis.logit_lens import logit_lens
    from oculi.analyzer import ModelAnalyzer
    from oculi.capture import (
        AttentionCapture,
        CaptureConfig,
        FullCapture,
        LogitCapture,
        LogitConfig,
        MLPCapture,
        MLPConfig,
        ResidualCapture,
        ResidualConfig,
    )
    from oculi.capture.io import load_capture
    from oculi.errors import (
        InputError,
        LayerIndexError,
        NonFiniteError,
        NonFiniteWarning,
        OculiError,
        StorageRangeWarning,
        UnknownSiteError,
        UnsupportedArchitectureError,
    )
    from oculi.harvest import harvest, open_harvest
    from oculi.models import Adapter, Anatomy, attach, load, register_anatomy, supported_model_types
    from oculi.patching import (
        activation_patching,
        attribution_patching,
        causal_tracing,
        path_patching,
    )


# exports that are submodules themselves (the others are attributes of their module)
_MODULES = frozenset({"intervention", "patching", "probe", "sae"})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'oculi' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if name in _MODULES else getattr(mod, name)
    globals()[name] = value  # later lookups skip this function
    return value


class _Package(types.ModuleType):
    """oculi's module type: ``import oculi.harvest`` binds the submodule to the package's
    ``harvest`` attribute, which would shadow the exported function ``oculi.harvest``; an
    export named like its own module keeps the export."""

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and name not in _MODULES
            and _EXPORTS.get(name) == value.__name__
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # by reference, like a plain module (cloudpickle dispatches on the exact type)
        return importlib.import_module, (self.__name__,)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "Adapter",
    "Anatomy",
    "AttentionCapture",
    "CaptureConfig",
    "FullCapture",
    "InputError",
    "LayerIndexError",
    "LogitCapture",
    "LogitConfig",
    "MLPCapture",
    "MLPConfig",
    "ModelAnalyzer",
    "NonFiniteError",
    "NonFiniteWarning",
    "OculiError",
    "ResidualCapture",
    "ResidualConfig",
    "StorageRangeWarning",
    "UnknownSiteError",
    "UnsupportedArchitectureError",
    "activation_patching",
    "attach",
    "attribution_patching",
    "causal_tracing",
    "harvest",
    "intervention",
    "load",
    "load_capture",
    "logit_lens",
    "open_harvest",
    "patching",
    "path_patching",
    "probe",
    "register_anatomy",
    "sae",
    "supported_model_types",
]
