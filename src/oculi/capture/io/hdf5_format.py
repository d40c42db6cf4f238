"""Captures in HDF5 (``pip install 'oculi[export]'``): one dataset per tensor, the metadata
JSON in the file attribute ``"oculi_capture"``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from oculi.capture.io.schema import HEADER_KEY, FileProblem, numpy_array
from oculi.errors import require_extra

SIGNATURE = b"\x89HDF\r\n\x1a\n"


def write(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    h5py = require_extra("h5py", "export")
    with h5py.File(tmp, "w") as f:
        f.attrs[HEADER_KEY] = text
        for key, t in tensors.items():
            f.create_dataset(key, data=numpy_array(t))


def read(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(metadata JSON, tensors)`` of an oculi HDF5 capture."""
    h5py = require_extra("h5py", "export")
    tensors = {}
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(HEADER_KEY)
            for key, item in f.items():
                if not isinstance(item, h5py.Dataset):
                    raise FileProblem(f"unexpected HDF5 group {key!r} (oculi writes datasets only)")
                tensors[key] = torch.from_numpy(np.asarray(item[()]))
    except OSError as exc:
        raise FileProblem(f"corrupt or truncated HDF5 file ({exc})") from None
    if text is None:
        raise FileProblem(f"an HDF5 file, but not an oculi capture (no {HEADER_KEY!r} attribute)")
    return text.decode() if isinstance(text, bytes) else str(text), tensors
