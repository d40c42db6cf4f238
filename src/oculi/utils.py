"""Device helpers: which accelerator to use and what it offers.

::

    from oculi.utils import get_default_device, get_device_info, is_mps_available

    device = get_default_device()    # cuda, else mps, else cpu
    print(get_device_info())         # {'device': 'cpu', 'name': ..., 'torch_version': ...}

``oculi.load(device=None)`` uses :func:`get_default_device`.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import torch


def is_mps_available() -> bool:
    """Whether Apple's Metal backend (MPS) is built into torch and usable on this machine."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_built() and mps.is_available())


def get_default_device() -> torch.device:
    """The best device here: ``cuda`` if a GPU is visible, else ``mps``, else ``cpu``.

    Example::

        model.to(get_default_device())
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    if is_mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_device_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """A readable summary of ``device`` (default: :func:`get_default_device`).

    Example::

        >>> get_device_info()                                 # doctest: +SKIP
        {'device': 'cuda', 'name': 'NVIDIA H100 80GB HBM3', 'torch_version': '2.13.0',
         'cuda_available': True, 'mps_available': False, 'device_count': 1,
         'memory_total_gb': 79.2, 'memory_free_gb': 78.6, 'capability': '9.0', 'cuda_version': '12.8'}

    Returns:
        ``device`` (type: ``"cuda"``, ``"mps"`` or ``"cpu"``), ``name``, ``torch_version``,
        ``cuda_available``, ``mps_available``, ``device_count``, and where torch can tell:
        ``memory_total_gb``/``memory_free_gb`` (cuda), ``capability`` and ``cuda_version``
        (cuda), ``memory_allocated_gb`` (mps), ``cpu_threads`` (cpu).
    """
    dev = torch.device(device) if device is not None else get_default_device()
    info: dict[str, Any] = {
        "device": dev.type,
        "name": platform.processor() or platform.machine() or "cpu",
        "torch_version": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "mps_available": is_mps_available(),
        "device_count": 1,
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        info.update(
            name=props.name,
            device_count=torch.cuda.device_count(),
            memory_total_gb=round(total / 2**30, 2),
            memory_free_gb=round(free / 2**30, 2),
            capability=f"{props.major}.{props.minor}",
            cuda_version=torch.version.cuda,
        )
    elif dev.type == "mps":
        info["name"] = f"Apple {platform.machine()} GPU (MPS)"
        mps = getattr(torch, "mps", None)
        if mps is not None and hasattr(mps, "current_allocated_memory"):
            info["memory_allocated_gb"] = round(mps.current_allocated_memory() / 2**30, 2)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


_PACKAGE = str(Path(__file__).resolve().parent)


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called from the caller of this function that
    points at the first frame outside the oculi package (the user's line), whatever the
    path through oculi's own functions was."""
    level = 1
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level
