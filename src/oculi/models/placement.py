"""Where a model's layers live and run, what is offloaded, and how its weights are quantized.

::

    describe_placement(adapter)
    # {"device_map": {"cpu": "model.embed_tokens, model.layers.0-8, model.norm, lm_head",
    #                 "disk": "model.layers.9-17"},
    #  "offloaded": "9 layers, 346.5 MiB (disk)", "quantization": None}

    layer_devices(adapter)        # [device] per decoder layer: where each one computes
    offload_bytes(adapter)        # [bytes] per layer its hook loads for each forward

``oculi info`` and ``oculi verify`` print the first; the memory plan
(:mod:`oculi.capture.memory`) reads the other two.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from oculi.models.weights import execution_device

__all__ = ["describe_placement", "layer_devices", "offload_bytes", "quantization_of"]


def layer_devices(adapter: Any) -> list[torch.device]:
    """The device each decoder layer computes on (its offload hook's execution device, or
    where its weights are).

    ::

        layer_devices(adapter)     # [device("cuda:0"), ..., device("cuda:1")], one per layer
    """
    return [execution_device(layer) for layer in adapter.layer_modules]


def offload_bytes(adapter: Any) -> list[int]:
    """Bytes of each decoder layer's offloaded weights (``meta`` placeholders): what its
    accelerate hooks load onto the execution device for each forward, and free after it.

    ::

        offload_bytes(adapter)     # one int per layer: 0 for layers whose weights are loaded
    """
    return [_meta_bytes(layer) for layer in adapter.layer_modules]


def _meta_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type == "meta")


def quantization_of(model: nn.Module) -> str | None:
    """The quantization scheme of a model loaded through a transformers quantizer, in words
    (``"torchao Int8WeightOnlyConfig"``, ``"quanto weights=int4"``, ``"bitsandbytes 4-bit
    nf4"``, ``"gptq 4-bit"``), or ``None``.

    ::

        quantization_of(adapter.model)   # None for a plain model
    """
    cfg: Any = getattr(getattr(model, "config", None), "quantization_config", None)
    if cfg is None:
        return None
    data = cfg if isinstance(cfg, dict) else cfg.to_dict()
    method = str(data.get("quant_method", "unknown")).split(".")[-1].lower()
    if method == "torchao":
        qt = data.get("quant_type")
        name = qt.get("default", qt) if isinstance(qt, dict) else qt
        if isinstance(name, dict):
            name = name.get("_type", name)
        return f"torchao {name}"
    if method == "quanto":
        return f"quanto weights={data.get('weights')}" + (
            f" activations={data['activations']}" if data.get("activations") else ""
        )
    if method in ("bitsandbytes", "bits_and_bytes"):
        if data.get("load_in_4bit"):
            return f"bitsandbytes 4-bit {data.get('bnb_4bit_quant_type', 'fp4')}"
        return "bitsandbytes 8-bit (LLM.int8)"
    bits = data.get("bits") or data.get("w_bit")
    return f"{method} {bits}-bit" if bits else method


def describe_placement(adapter: Any) -> dict[str, Any]:
    """``{"device_map", "offloaded", "quantization"}`` of the adapter's model, as text.

    ``device_map``: the modules on each device of the ``device_map`` it was loaded with
    (consecutive layers joined: ``model.layers.9-17``), or the one device; ``offloaded``: how
    many layers' weights are offloaded and their size, or ``"none"``.

    ::

        describe_placement(adapter)   # {"device_map": "cpu", "offloaded": "none", "quantization": None}
    """
    model = adapter.model
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        by_device: dict[str, list[str]] = {}
        for name, device in dmap.items():
            by_device.setdefault(_device_name(device), []).append(name or "(whole model)")
        device_map: Any = {d: _join_ranges(names) for d, names in by_device.items()}
    else:
        device_map = str(adapter.device)
    per_layer = offload_bytes(adapter)
    n = sum(1 for b in per_layer if b)
    total = _meta_bytes(model)
    if total:
        where = sorted(
            {
                _device_name(device)
                for name, device in (dmap or {}).items()
                if _meta_bytes(model.get_submodule(name) if name else model)
            }
        )
        offloaded = f"{n} layers, {_size(total)}" + (f" ({', '.join(where)})" if where else "")
    else:
        offloaded = "none"
    return {
        "device_map": device_map,
        "offloaded": offloaded,
        "quantization": quantization_of(model),
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _device_name(device: Any) -> str:
    if isinstance(device, int):
        return f"cuda:{device}"
    return str(device)


def _join_ranges(names: list[str]) -> str:
    """``["model.layers.0", "model.layers.1", "model.norm"]`` -> ``"model.layers.0-1, model.norm"``."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None
    for name in names:
        m = re.fullmatch(r"(.*\.)(\d+)", name)
        if m and run and run[0] == m.group(1) and int(m.group(2)) == run[2] + 1:
            run = (run[0], run[1], int(m.group(2)))
            continue
        if run:
            out.append(_fmt(run))
            run = None
        if m:
            run = (m.group(1), int(m.group(2)), int(m.group(2)))
        else:
            out.append(name)
    if run:
        out.append(_fmt(run))
    return ", ".join(out)


def _fmt(run: tuple[str, int, int]) -> str:
    prefix, lo, hi = run
    return f"{prefix}{lo}" if lo == hi else f"{prefix}{lo}-{hi}"
