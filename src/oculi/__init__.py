"""oculi: mechanistic interpretability for Hugging Face decoder language models.

::

    import oculi
    adapter = oculi.load()                       # Gemma 3 270M, embedded and cached
    full = adapter.capture_full("The Eiffel Tower is located in the city of")
    full.logits.top_k_indices[:, -1, 0]          # each layer's top prediction
"""

from oculi import intervention as intervention
from oculi import patching as patching
from oculi.analysis.logit_lens import logit_lens
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
    OculiError,
    StorageRangeWarning,
    UnknownSiteError,
    UnsupportedArchitectureError,
)
from oculi.harvest import harvest, open_harvest
from oculi.models import Adapter, Anatomy, attach, load, register_anatomy, supported_model_types
from oculi.patching import causal_tracing

__version__ = "0.1.0"

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
    "NonFiniteError",
    "OculiError",
    "ResidualCapture",
    "ResidualConfig",
    "StorageRangeWarning",
    "UnknownSiteError",
    "UnsupportedArchitectureError",
    "attach",
    "causal_tracing",
    "harvest",
    "load",
    "load_capture",
    "logit_lens",
    "open_harvest",
    "patching",
    "register_anatomy",
    "supported_model_types",
]
