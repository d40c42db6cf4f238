"""The capture file's schema: its metadata JSON, the dimension names of each field, checks.

Nothing here knows a file format or a capture class: a file is ``(metadata JSON, tensors by
key)`` whatever holds it, and these functions build and verify that pair.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import numpy as np
import torch

MAGIC = "oculi-capture"
"""The ``format`` field of every saved capture's JSON header.

::

    header = json.loads(safe_open("run.safetensors", "np").metadata()[HEADER_KEY])
    header["format"] == MAGIC
"""
FORMAT_VERSION = 1
"""The capture file layout's version; ``load_capture`` refuses a newer one.

::

    header["format_version"] <= FORMAT_VERSION
"""
HEADER_KEY = "oculi_capture"
"""The metadata key under which a capture file keeps its JSON header.

::

    safe_open("run.safetensors", "np").metadata()[HEADER_KEY]   # '{"format": ...}'
"""

# Dimension names of each tensor field (a leading "B" is added for batched captures). A
# loaded file must fit them: L is the number of layers, H/Hkv/D/K come from the attributes,
# the other names must agree across the fields of one structure.
DIMS: dict[str, dict[str, tuple[str, ...]]] = {
    "AttentionCapture": {
        "queries": ("L", "H", "T", "D"),
        "keys": ("L", "Hkv", "T", "D"),
        "values": ("L", "Hkv", "T", "D"),
        "patterns": ("L", "H", "T", "T"),
        "head_outputs": ("L", "H", "T", "D"),
        "head_contributions": ("L", "H", "T", "d_model"),
    },
    "ResidualCapture": {
        **dict.fromkeys(
            ("pre_attn", "post_attn", "pre_mlp", "post_mlp", "attn_out", "mlp_out"),
            ("L", "T", "d_model"),
        ),
        "final_normalized": ("T", "d_model"),
        "final_norm_bias": ("d_model",),
    },
    "MLPCapture": {
        "gate": ("L", "T", "d_mlp"),
        "up": ("L", "T", "d_mlp"),
        "post_activation": ("L", "T", "d_mlp"),
        "output": ("L", "T", "d_model"),
    },
    "LogitCapture": {
        "normalized": ("L", "T", "d_model"),
        "final_normalized": ("T", "d_model"),
        "top_k_values": ("L", "T", "K"),
        "top_k_indices": ("L", "T", "K"),
        "logsumexp": ("L", "T"),
    },
}
# Fields that belong to the model, not to a sequence: no leading "B" in batched captures.
UNBATCHED = frozenset({"final_norm_bias"})
# NumPy and HDF5 lack these dtypes; they are stored as float32, which holds them exactly.
WIDENED = {torch.bfloat16} | {
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
}


class FileProblem(Exception):
    """What is wrong with a file being read; ``load_capture`` names the file around it."""


# -- tensors -------------------------------------------------------------------------------
def to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each owning its storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if t.numel() and (
            storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size()
        ):
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def crc32(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def numpy_array(t: torch.Tensor) -> np.ndarray:
    """``t`` as a NumPy array, bf16/fp8 widened exactly to float32."""
    return (t.float() if t.dtype in WIDENED else t).numpy()


# -- the metadata ------------------------------------------------------------------------
def file_metadata(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The JSON object a file holds for the structure ``node`` and its CPU ``tensors``."""
    from oculi import __version__

    return {
        "format": MAGIC,
        "format_version": FORMAT_VERSION,
        "oculi_version": __version__,
        "structure": node["structure"],
        "capture": node,
        "tensors": {
            key: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "crc32": crc32(t)}
            for key, t in tensors.items()
        },
    }


def parse_metadata(text: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The file's metadata, checked against its tensors (which are converted back in place).

    Raises:
        FileProblem: corrupt or foreign metadata, a newer format version, tensors missing,
            unlisted, of another dtype or shape than listed, or failing their checksum.
    """
    try:
        meta = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise FileProblem(f"corrupt metadata (not JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MAGIC:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FileProblem(f"not an oculi capture (metadata format {found!r}, expected {MAGIC!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FileProblem(f"corrupt metadata (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise FileProblem(
            f"written by a newer oculi ({meta.get('oculi_version')}, capture format version "
            f"{version}); this oculi reads version {FORMAT_VERSION}: upgrade oculi"
        )
    listed = meta.get("tensors")
    if not isinstance(listed, dict) or not isinstance(meta.get("capture"), dict):
        raise FileProblem("corrupt metadata (no 'capture' or 'tensors' entry)")
    missing = [key for key in listed if key not in tensors]
    extra = [key for key in tensors if key not in listed]
    if missing:
        raise FileProblem(f"tensors listed in its metadata are missing: {', '.join(missing)}")
    if extra:
        raise FileProblem(f"it holds tensors its metadata does not list: {', '.join(extra)}")
    for key, spec in listed.items():
        tensors[key] = _checked(key, tensors[key], spec)
    return meta


def _checked(key: str, t: torch.Tensor, spec: Any) -> torch.Tensor:
    if not isinstance(spec, dict) or not {"dtype", "shape", "crc32"} <= spec.keys():
        raise FileProblem(f"corrupt metadata for tensor {key!r}")
    dtype = getattr(torch, str(spec["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise FileProblem(f"tensor {key!r} has an unknown dtype {spec['dtype']!r}")
    if t.dtype != dtype and dtype in WIDENED and t.dtype == torch.float32:
        t = t.to(dtype)  # npz/HDF5 store bf16/fp8 as float32
    if t.dtype != dtype:
        raise FileProblem(
            f"tensor {key!r} is {dtype_name(t.dtype)} but the metadata says {spec['dtype']}"
        )
    if list(t.shape) != spec["shape"]:
        raise FileProblem(
            f"tensor {key!r} has shape {list(t.shape)} but the metadata says {spec['shape']}"
        )
    t = t.contiguous()
    if crc32(t) != spec["crc32"]:
        raise FileProblem(f"tensor {key!r} is corrupt: its checksum does not match the one saved")
    return t


def shape_problem(
    structure: str,
    values: dict[str, torch.Tensor],
    layers: tuple[int, ...],
    attrs: dict[str, Any],
    *,
    batched: bool,
) -> str | None:
    """What is wrong with the tensors' shapes given their dimension names, or ``None``.

    ``L`` is bound by the layers and ``H``/``Hkv``/``D``/``K`` by the attributes (when set);
    the other names by their first use.
    """
    bound: dict[str, int] = {"L": len(layers)}
    for dim, attr in (("H", "n_heads"), ("Hkv", "n_kv_heads"), ("D", "head_dim"), ("K", "top_k")):
        if isinstance(attrs.get(attr), int) and attrs[attr] > 0:
            bound[dim] = attrs[attr]
    for name, t in values.items():
        dims = DIMS[structure].get(name, ("L",))
        dims = ("B", *dims) if batched and name not in UNBATCHED else dims
        kept = (
            f"{name} has shape {list(t.shape)}, but a {structure} keeps it as [{', '.join(dims)}]"
        )
        if t.dim() < len(dims) or (name in DIMS[structure] and t.dim() != len(dims)):
            return kept
        for dim, size in zip(dims, t.shape):
            if bound.setdefault(dim, size) != size:
                return f"{kept} and {dim} is {bound[dim]} here (layers {list(layers)})"
    return None
