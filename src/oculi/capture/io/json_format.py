"""The metadata-only export (``format="json"``): shapes, dtypes and checksums, no tensor data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from oculi.capture.io.schema import MAGIC


def write(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    tmp.write_text(json.dumps(json.loads(text), indent=2) + "\n")


def problem(path: Path) -> str:
    """Why a JSON file cannot be loaded as a capture."""
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        meta = None
    if isinstance(meta, dict) and meta.get("format") == MAGIC:
        return (
            "it is a metadata-only JSON export (format='json'): it records shapes and dtypes "
            "but no tensor data; save with format='safetensors' to load a capture back"
        )
    return "a JSON file, not an oculi capture (oculi reads safetensors, .npz and HDF5 captures)"
