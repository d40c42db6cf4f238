"""Imports every built-in family so that its anatomy is registered."""

from oculi.models.gemma import anatomy as _gemma  # noqa: F401
from oculi.models.gpt2 import anatomy as _gpt2  # noqa: F401
from oculi.models.gpt_neox import anatomy as _gpt_neox  # noqa: F401
from oculi.models.llama import anatomy as _llama  # noqa: F401
from oculi.models.olmo2 import anatomy as _olmo2  # noqa: F401
from oculi.models.phi3 import anatomy as _phi3  # noqa: F401
from oculi.models.qwen import anatomy as _qwen  # noqa: F401
