"""Plain JSON values from results (tensors, arrays, tuples, NaN)."""

from __future__ import annotations

import math
from typing import Any


def to_jsonable(value: Any) -> Any:
    """Lists from tensors and numpy arrays, ``None`` for NaN/Inf, string keys, recursively."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
