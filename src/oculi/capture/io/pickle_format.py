"""Captures as pickles: written only when asked for, read only with ``allow_pickle=True``.

Unpickling a file can run any code it contains, so :func:`oculi.load_capture` refuses pickles
(plain, or inside a ``torch.save`` zip) unless the caller opts in for a file they trust.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from oculi.capture.io.schema import HEADER_KEY, FileProblem

REFUSED = (
    "it is a pickle file, and unpickling can execute arbitrary code hidden in it; "
    "oculi never loads pickles silently. If you trust this file, call "
    "load_capture(path, allow_pickle=True)"
)


def looks_like(head: bytes) -> bool:
    """A pickle of protocol 2 or later: the PROTO opcode (0x80), then the protocol number."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL


def write(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    with open(tmp, "wb") as fh:
        pickle.dump({HEADER_KEY: text, "tensors": tensors}, fh, protocol=pickle.HIGHEST_PROTOCOL)


def read(path: Path, kind: str) -> Any:
    """Unpickle ``path`` (``kind`` ``"pickle"`` or ``"torch-pickle"``): runs its code."""
    try:
        if kind == "torch-pickle":
            return torch.load(path, weights_only=False)
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except Exception as exc:
        raise FileProblem(f"corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None


def payload_parts(payload: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """``(metadata JSON, tensors)`` of an unpickled oculi payload."""
    if not (isinstance(payload, dict) and HEADER_KEY in payload and "tensors" in payload):
        raise FileProblem(f"the pickle holds a {type(payload).__name__}, not an oculi capture")
    return payload[HEADER_KEY], dict(payload["tensors"])
