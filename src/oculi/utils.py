"""Device helpers: which accelerator to use and what it offers.

::

    from oculi.utils import get_default_device, get_device_info, is_mps_available

    device = get_default_device()    # cuda, else mps, else cpu
    print(get_device_info())         # {'device': 'cpu', 'name': ..., 'torch_version': ...}
    resolve_device("cuda:1")         # torch.device, or InputError naming the usable devices

``oculi.load(device=None)`` uses :func:`get_default_device`; every device a user names
(``oculi.load(device=)``, ``--device``, a config's ``device:``, a capture's
``storage_device``) goes through :func:`resolve_device` before anything is loaded or moved.
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


def available_devices() -> list[str]:
    """The devices this torch can use here: ``cpu``, each ``cuda:i``, ``mps``.

    Example::

        >>> available_devices()                               # doctest: +SKIP
        ['cpu', 'cuda', 'cuda:0']
    """
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if is_mps_available():
        out.append("mps")
    return out


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` once it is known to be usable here (``None``: the
    default of :func:`get_default_device`).

    Raises:
        InputError: a device string torch does not understand, or a device this torch cannot
            use (``cuda`` on a CPU-only build or without a GPU, ``cuda:3`` with one GPU, ``mps``
            off Apple silicon); the message names the devices it can use.
    """
    from oculi.errors import InputError, brief

    if device is None:
        return get_default_device()
    usable = ", ".join(available_devices())
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"device must be a string such as 'cpu' or 'cuda:0', got {brief(device)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(
            f"device {brief(device, 40)} is not a device name; this torch can use: {usable}"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        built = torch.version.cuda is not None or torch.version.hip is not None
        if not torch.cuda.is_available():
            why = "sees no GPU" if built else f"is built without CUDA ({torch.__version__})"
            raise InputError(f"device {str(dev)!r} is not available: this torch {why}; it can "
                             f"use: {usable}")  # fmt: skip
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"device {str(dev)!r} is not available: {torch.cuda.device_count()} GPU(s) "
                f"visible; this torch can use: {usable}"
            )
        return dev
    if dev.type == "mps":
        if not is_mps_available():
            raise InputError(
                f"device 'mps' is not available (Apple silicon's Metal backend); this torch "
                f"can use: {usable}"
            )
        return dev
    raise InputError(f"device {str(dev)!r} is not one oculi runs on; this torch can use: {usable}")


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
