"""Captures as NumPy ``.npz`` archives: one array per tensor plus a ``"__meta__"`` string.

NumPy has no bf16 or fp8: those are stored as float32 (exact) and converted back on load.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from oculi.capture.io.schema import FileProblem, numpy_array


def write(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    arrays = {key: numpy_array(t) for key, t in tensors.items()}
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        # mypy matches **arrays against savez's allow_pickle: bool; the keys are tensor names
        np.savez(fh, __meta__=np.array(text), **arrays)  # type: ignore[arg-type]


def read(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(metadata JSON, tensors)`` of an oculi ``.npz`` capture; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise FileProblem(
                "the .npz holds pickled Python objects (an object array); unpickling can "
                "execute arbitrary code, and oculi's own .npz files never contain any"
            ) from None
        raise FileProblem(f"corrupt or truncated .npz archive ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise FileProblem(f"corrupt or truncated .npz archive ({exc})") from None
    meta = arrays.pop("__meta__", None)
    if meta is None or meta.dtype.kind != "U" or meta.ndim != 0:
        raise FileProblem("an .npz archive, but not an oculi capture (no '__meta__' string entry)")
    return str(meta[()]), {key: torch.from_numpy(a) for key, a in arrays.items()}
