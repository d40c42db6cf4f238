"""Captures in safetensors: the tensors, and the metadata JSON in the header's ``__metadata__``.

A safetensors file starts with its header's length as 8 little-endian bytes, then the header
(a JSON object), then the tensor data. The length's low byte can be any value, 0x80 (the
pickle PROTO opcode) included, so a file is recognised by parsing its whole header, never by
its first byte alone.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Literal

import torch

from oculi.capture.io.schema import HEADER_KEY, FileProblem

# A header longer than this is not a real one (safetensors itself caps headers at 100 MB).
_MAX_HEADER = 2**40


def write(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, tmp, metadata={HEADER_KEY: text})


def probe(path: Path, head: bytes, size: int) -> Literal["valid", "damaged"] | None:
    """Whether the file is a safetensors file: ``"valid"`` when its whole header parses,
    ``"damaged"`` when it starts like one but its header is cut short or not JSON, else
    ``None``."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    (n,) = struct.unpack("<Q", head[:8])
    if n >= _MAX_HEADER:
        return None
    if 8 + n > size:
        return "damaged"
    with open(path, "rb") as fh:
        fh.seek(8)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        return "damaged"
    return "valid" if isinstance(header, dict) else "damaged"


def read(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """``(metadata JSON, tensors)`` of an oculi safetensors capture."""
    from safetensors import safe_open

    size = path.stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if 8 + n > size:
            raise FileProblem(
                f"truncated: its safetensors header claims {n} bytes, but the file has only "
                f"{size - 8} after the length prefix"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise FileProblem(f"corrupt safetensors header (not JSON: {exc})") from None
    text = (header.get("__metadata__") or {}).get(HEADER_KEY) if isinstance(header, dict) else None
    if text is None:
        raise FileProblem(
            f"a safetensors file, but not an oculi capture (no {HEADER_KEY!r} entry in its "
            "header metadata); read raw tensors with safetensors.torch.load_file"
        )
    try:
        with safe_open(path, framework="pt") as f:
            # clone: safetensors memory-maps the file, and a capture must not change with it
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise FileProblem(f"corrupt or truncated safetensors data ({exc})") from None
    return text, tensors
