"""Captures as files: save and load them, export them for NumPy, HDF5 and JSON readers.

::

    full = adapter.capture_full("The Eiffel Tower is in")
    full.save("eiffel.safetensors")                  # or save_capture(full, path)
    full = oculi.load_capture("eiffel.safetensors")  # bit-exact, no model needed
    full.save("eiffel.npz", format="npz")            # np.load(...)["attention.patterns"]

**The file.** One safetensors file. Its tensors are the capture's tensor fields, named by field
(``"queries"``) or, for a :class:`FullCapture`, by part and field (``"attention.queries"``).
Its header metadata holds one JSON string under ``"oculi_capture"``::

    {"format": "oculi-capture", "format_version": 1, "oculi_version": "0.1.0",
     "structure": "FullCapture",
     "capture": {"structure": "FullCapture", "metadata": {...},
                 "parts": {"attention": {"structure": "AttentionCapture", "layers": [0, 1],
                                         "attrs": {"n_heads": 4, "qk_stage": "post_rope", ...},
                                         "metadata": {...}, "tensors": ["queries", ...]},
                           "residual": null, ...}},
     "tensors": {"attention.queries": {"dtype": "float32", "shape": [2, 4, 6, 8],
                                       "crc32": 1234567}, ...}}

A single file is easy to move around, safetensors never executes code and can be read by
other tools, and the JSON can be read without touching the tensors. Dtypes are kept (fp16
and bf16 included), fields that were not captured are absent and load as ``None``, and each
tensor's CRC-32 lets :func:`load_capture` tell a damaged file from a good one. A
:class:`LogitCapture` is saved with its top-k (computed first if needed) but without the
unembedding, which belongs to the model; call ``.attach_unembedding(adapter)`` after loading
to compute anything beyond the saved top-k. ``metadata`` must be JSON-serialisable (tuples
come back as lists).

**Exports.** ``format="npz"``: the same tensors as arrays plus a ``"__meta__"`` string holding
the JSON (NumPy has no bf16 or fp8, so those are stored as exact float32 and converted back on
load). ``format="hdf5"`` (``pip install 'oculi[export]'``): one dataset per tensor, the JSON in
the file attribute ``"oculi_capture"``. ``format="json"``: the JSON alone (shapes and dtypes,
no tensor data), for inspection. ``format="pickle"``: only when asked for, and loaded only with
``allow_pickle=True``, because unpickling a file can run any code it contains.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oculi.capture.lens import LogitCapture
from oculi.capture.structures import (
    AttentionCapture,
    FullCapture,
    MLPCapture,
    ResidualCapture,
    _Capture,
)
from oculi.errors import CaptureFileError, InputError, require_extra

MAGIC = "oculi-capture"
FORMAT_VERSION = 1
HEADER_KEY = "oculi_capture"
FORMATS = ("safetensors", "npz", "hdf5", "json", "pickle")

Capture = AttentionCapture | ResidualCapture | MLPCapture | LogitCapture | FullCapture
_CAPTURE_TYPES = (AttentionCapture, ResidualCapture, MLPCapture, LogitCapture, FullCapture)
_STRUCTURES: dict[str, type] = {cls.__name__: cls for cls in _CAPTURE_TYPES}
_PARTS = {
    "attention": AttentionCapture,
    "residual": ResidualCapture,
    "mlp": MLPCapture,
    "logits": LogitCapture,
}
_LOGIT_TENSORS = ("normalized", "final_normalized", "top_k_values", "top_k_indices", "logsumexp")
_LOGIT_ATTRS = ("softcap", "top_k", "chunk_size")

# Dimension names of each tensor field (a leading "B" is added for batched captures). A
# loaded file must fit them: L is the number of layers, H/Hkv/D/K come from the attributes,
# the other names must agree across the fields of one structure.
_DIMS: dict[str, dict[str, tuple[str, ...]]] = {
    "AttentionCapture": {
        "queries": ("L", "H", "T", "D"),
        "keys": ("L", "Hkv", "T", "D"),
        "values": ("L", "Hkv", "T", "D"),
        "patterns": ("L", "H", "T", "T"),
        "head_outputs": ("L", "H", "T", "D"),
        "head_contributions": ("L", "H", "T", "d_model"),
    },
    "ResidualCapture": dict.fromkeys(
        ("pre_attn", "post_attn", "pre_mlp", "post_mlp", "attn_out", "mlp_out"),
        ("L", "T", "d_model"),
    ),
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
# NumPy and HDF5 lack these dtypes; they are stored as float32, which holds them exactly.
_WIDENED = {torch.bfloat16} | {
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
}


# -- saving ------------------------------------------------------------------------------
def save_capture(
    capture: Capture | _Capture, path: str | os.PathLike, *, format: str = "safetensors"
) -> None:
    """Write ``capture`` to ``path`` (the file is written whole, then moved into place).

    Args:
        capture: an ``AttentionCapture``, ``ResidualCapture``, ``MLPCapture``,
            ``LogitCapture`` or ``FullCapture``.
        path: the file to write; no suffix is added.
        format: ``"safetensors"`` (loadable, the default), ``"npz"``, ``"hdf5"`` (both
            loadable), ``"json"`` (metadata only) or ``"pickle"`` (loadable only with
            ``allow_pickle=True``).

    Raises:
        ValueError: an unknown format.
        InputError: metadata JSON cannot hold, or a LogitCapture with neither its top-k nor
            an unembedding to compute them.
        MissingExtraError: ``format="hdf5"`` without h5py.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown capture format {format!r}; choose one of {', '.join(FORMATS)}")
    node, tensors = _encode(capture, "")
    tensors = _to_cpu(tensors)
    meta = {
        "format": MAGIC,
        "format_version": FORMAT_VERSION,
        "oculi_version": _oculi_version(),
        "structure": node["structure"],
        "capture": node,
        "tensors": {
            key: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "crc32": _crc32(t)}
            for key, t in tensors.items()
        },
    }
    text = _dump_json(meta, capture)
    writers = {
        "safetensors": _write_safetensors,
        "npz": _write_npz,
        "hdf5": _write_hdf5,
        "json": lambda tmp, text, tensors: tmp.write_text(json.dumps(meta, indent=2) + "\n"),
        "pickle": _write_pickle,
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        writers[format](tmp, text, tensors)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def capture_to_numpy(capture: Capture | _Capture) -> dict[str, np.ndarray]:
    """The arrays a saved file would hold, by the same names (bf16/fp8 widened to float32)."""
    return {key: _numpy(t) for key, t in _to_cpu(_encode(capture, "")[1]).items()}


def _encode(capture: Any, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(JSON node, tensors by file key)`` for one structure."""
    if isinstance(capture, FullCapture):
        parts: dict[str, dict[str, Any] | None] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name in _PARTS:
            part = getattr(capture, name)
            parts[name] = None
            if part is not None:
                parts[name], part_tensors = _encode(part, f"{prefix}{name}.")
                tensors.update(part_tensors)
        return {"structure": "FullCapture", "metadata": capture.metadata, "parts": parts}, tensors
    if isinstance(capture, LogitCapture):
        if capture._topk is None and capture.unembed is None:
            raise InputError(
                "cannot save this LogitCapture: its top-k were never computed and it has no "
                "unembedding to compute them; call .attach_unembedding(adapter) first"
            )
        values = dict(
            normalized=capture.normalized,
            final_normalized=capture.final_normalized,
            top_k_values=capture.top_k_values,
            top_k_indices=capture.top_k_indices,
            logsumexp=capture.logsumexp,
        )
        attrs = {name: getattr(capture, name) for name in _LOGIT_ATTRS}
        structure = "LogitCapture"
    elif isinstance(capture, _Capture):
        structure = next(n for n, c in _STRUCTURES.items() if isinstance(capture, c))
        values = {name: getattr(capture, name) for name in _tensor_fields(_STRUCTURES[structure])}
        attrs = {name: getattr(capture, name) for name in _attr_fields(_STRUCTURES[structure])}
    else:
        raise TypeError(
            f"save_capture takes an oculi capture structure ({', '.join(_STRUCTURES)}), "
            f"got {type(capture).__name__}"
        )
    present = {name: t for name, t in values.items() if t is not None}
    batched = not capture.metadata.get("single", True)
    problem = _shape_problem(structure, present, capture.layers, attrs, batched=batched)
    if problem:
        where = f"the {prefix[:-1]} part's " if prefix else ""
        raise InputError(f"cannot save this capture: {where}{problem}")
    node = {
        "structure": structure,
        "layers": [int(layer) for layer in capture.layers],
        "attrs": attrs,
        "metadata": capture.metadata,
        "tensors": list(present),
    }
    return node, {prefix + name: t for name, t in present.items()}


def _tensor_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if "Tensor" in str(f.type)]


def _attr_fields(cls: type) -> list[str]:
    tensors = set(_tensor_fields(cls))
    return [f.name for f in fields(cls) if f.name not in tensors | {"layers", "metadata"}]


def _to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def _dump_json(meta: dict[str, Any], capture: Any) -> str:
    try:
        return json.dumps(meta)
    except (TypeError, ValueError):
        bad = [
            f"{key!r} ({type(value).__name__})"
            for part in (capture, *(getattr(capture, p, None) for p in _PARTS))
            for key, value in (getattr(part, "metadata", None) or {}).items()
            if not _json_ok(value)
        ]
        raise InputError(
            f"capture metadata must be JSON-serialisable; these entries are not: "
            f"{', '.join(dict.fromkeys(bad)) or 'unknown'} (convert them to lists/str/numbers)"
        ) from None


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _oculi_version() -> str:
    from oculi import __version__

    return __version__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _crc32(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype in _WIDENED else t).numpy()


def _write_safetensors(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, tmp, metadata={HEADER_KEY: text})


def _write_npz(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    arrays = {key: _numpy(t) for key, t in tensors.items()}
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        # mypy matches **arrays against savez's allow_pickle: bool; the keys are tensor names
        np.savez(fh, __meta__=np.array(text), **arrays)  # type: ignore[arg-type]


def _write_hdf5(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    h5py = require_extra("h5py", "export")
    with h5py.File(tmp, "w") as f:
        f.attrs[HEADER_KEY] = text
        for key, t in tensors.items():
            f.create_dataset(key, data=_numpy(t))


def _write_pickle(tmp: Path, text: str, tensors: dict[str, torch.Tensor]) -> None:
    with open(tmp, "wb") as fh:
        pickle.dump({HEADER_KEY: text, "tensors": tensors}, fh, protocol=pickle.HIGHEST_PROTOCOL)


# -- loading -----------------------------------------------------------------------------
def load_capture(path: str | os.PathLike, *, allow_pickle: bool = False) -> Capture:
    """Read a capture written by :func:`save_capture` (safetensors, npz or HDF5).

    Example::

        full = oculi.load_capture("eiffel.safetensors")
        full["blocks.3.attn.hook_pattern"]

    The format is recognised from the file's first bytes, not its name. Every tensor is
    checked against the metadata (names, dtypes, shapes, checksums) and the shapes against
    the structure (layers, heads, top-k).

    Args:
        path: the file.
        allow_pickle: also read files written with ``format="pickle"``. Unpickling runs
            whatever code the file contains: only for files you trust.

    Raises:
        CaptureFileError: a missing, empty, truncated or corrupt file, one that is not an
            oculi capture, a pickle (unless ``allow_pickle``), a JSON metadata export, or one
            written by a newer oculi. The message names the file and the problem.
    """
    path = Path(path)
    kind = _sniff(path)
    if kind in ("pickle", "torch-pickle"):
        if not allow_pickle:
            raise _error(
                path,
                "it is a pickle file, and unpickling can execute arbitrary code hidden in it; "
                "oculi never loads pickles silently. If you trust this file, call "
                "load_capture(path, allow_pickle=True)",
            )
        return _load_pickle(path, kind)
    if kind == "json":
        raise _error(path, _json_problem(path))
    reader = {"safetensors": _read_safetensors, "npz": _read_npz, "hdf5": _read_hdf5}[kind]
    text, tensors = reader(path)
    return _decode_file(path, text, tensors)


def _json_problem(path: Path) -> str:
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


def _error(path: Path, what: str) -> CaptureFileError:
    return CaptureFileError(f"cannot load capture file '{path}': {what}")


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _sniff(path: Path) -> str:
    if not path.exists():
        raise _error(path, "no such file")
    if path.is_dir():
        raise _error(path, "it is a directory, not a capture file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if size == 0:
        raise _error(path, "the file is empty (0 bytes)")
    if head.startswith(_HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _error(path, f"corrupt or truncated zip/.npz archive ({exc})") from None
        if any(name.endswith(".pkl") for name in names):
            return "torch-pickle"  # torch.save's zip holds a pickle
        return "npz"
    if head[0] == 0x80:  # the PROTO opcode every pickle since protocol 2 starts with
        return "pickle"
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 2**40:
        return "safetensors"
    if head.lstrip()[:1] == b"{":
        return "json"
    raise _error(
        path,
        f"not an oculi capture: unrecognised format ({size} bytes, starting {head[:8]!r}); "
        "oculi reads captures saved as safetensors, .npz or HDF5",
    )


def _read_safetensors(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    size = path.stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if 8 + n > size:
            raise _error(
                path,
                f"truncated: its safetensors header claims {n} bytes, but the file has only "
                f"{size - 8} after the length prefix",
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _error(path, f"corrupt safetensors header (not JSON: {exc})") from None
    text = (header.get("__metadata__") or {}).get(HEADER_KEY) if isinstance(header, dict) else None
    if text is None:
        raise _error(
            path,
            f"a safetensors file, but not an oculi capture (no {HEADER_KEY!r} entry in its "
            "header metadata); read raw tensors with safetensors.torch.load_file",
        )
    try:
        with safe_open(path, framework="pt") as f:
            # clone: safetensors memory-maps the file, and a capture must not change with it
            tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise _error(path, f"corrupt or truncated safetensors data ({exc})") from None
    return text, tensors


def _read_npz(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise _error(
                path,
                "the .npz holds pickled Python objects (an object array); unpickling can "
                "execute arbitrary code, and oculi's own .npz files never contain any",
            ) from None
        raise _error(path, f"corrupt or truncated .npz archive ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _error(path, f"corrupt or truncated .npz archive ({exc})") from None
    meta = arrays.pop("__meta__", None)
    if meta is None or meta.dtype.kind != "U" or meta.ndim != 0:
        raise _error(path, "an .npz archive, but not an oculi capture (no '__meta__' string entry)")
    return str(meta[()]), {key: torch.from_numpy(a) for key, a in arrays.items()}


def _read_hdf5(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    h5py = require_extra("h5py", "export")
    tensors = {}
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(HEADER_KEY)
            for key, item in f.items():
                if not isinstance(item, h5py.Dataset):
                    raise _error(
                        path, f"unexpected HDF5 group {key!r} (oculi writes datasets only)"
                    )
                tensors[key] = torch.from_numpy(np.asarray(item[()]))
    except OSError as exc:
        raise _error(path, f"corrupt or truncated HDF5 file ({exc})") from None
    if text is None:
        raise _error(path, f"an HDF5 file, but not an oculi capture (no {HEADER_KEY!r} attribute)")
    return text.decode() if isinstance(text, bytes) else str(text), tensors


def _load_pickle(path: Path, kind: str) -> Capture:
    try:
        if kind == "torch-pickle":
            payload = torch.load(path, weights_only=False)
        else:
            with open(path, "rb") as fh:
                payload = pickle.load(fh)
    except Exception as exc:
        raise _error(path, f"corrupt or truncated pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(payload, _CAPTURE_TYPES):
        return payload
    if not (isinstance(payload, dict) and HEADER_KEY in payload and "tensors" in payload):
        raise _error(path, f"the pickle holds a {type(payload).__name__}, not an oculi capture")
    return _decode_file(path, payload[HEADER_KEY], dict(payload["tensors"]))


def _decode_file(path: Path, text: Any, tensors: dict[str, torch.Tensor]) -> Capture:
    """Check the metadata and tensors against each other, then rebuild the structure."""
    try:
        meta = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise _error(path, f"corrupt metadata (not JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MAGIC:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise _error(path, f"not an oculi capture (metadata format {found!r}, expected {MAGIC!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _error(path, f"corrupt metadata (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise _error(
            path,
            f"written by a newer oculi ({meta.get('oculi_version')}, capture format version "
            f"{version}); this oculi reads version {FORMAT_VERSION}: upgrade oculi",
        )
    listed = meta.get("tensors")
    if not isinstance(listed, dict) or not isinstance(meta.get("capture"), dict):
        raise _error(path, "corrupt metadata (no 'capture' or 'tensors' entry)")
    missing = [key for key in listed if key not in tensors]
    extra = [key for key in tensors if key not in listed]
    if missing:
        raise _error(path, f"tensors listed in its metadata are missing: {', '.join(missing)}")
    if extra:
        raise _error(path, f"it holds tensors its metadata does not list: {', '.join(extra)}")
    for key, spec in listed.items():
        tensors[key] = _check_tensor(path, key, tensors[key], spec)
    claimed: set[str] = set()
    capture = _decode(path, meta["capture"], tensors, "", claimed)
    unclaimed = [key for key in listed if key not in claimed]
    if unclaimed:
        raise _error(path, f"tensors no structure claims: {', '.join(unclaimed)}")
    return capture


def _check_tensor(path: Path, key: str, t: torch.Tensor, spec: Any) -> torch.Tensor:
    if not isinstance(spec, dict) or not {"dtype", "shape", "crc32"} <= spec.keys():
        raise _error(path, f"corrupt metadata for tensor {key!r}")
    dtype = getattr(torch, str(spec["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise _error(path, f"tensor {key!r} has an unknown dtype {spec['dtype']!r}")
    if t.dtype != dtype and dtype in _WIDENED and t.dtype == torch.float32:
        t = t.to(dtype)  # npz/HDF5 store bf16/fp8 as float32
    if t.dtype != dtype:
        raise _error(
            path, f"tensor {key!r} is {_dtype_name(t.dtype)} but the metadata says {spec['dtype']}"
        )
    if list(t.shape) != spec["shape"]:
        raise _error(
            path, f"tensor {key!r} has shape {list(t.shape)} but the metadata says {spec['shape']}"
        )
    t = t.contiguous()
    if _crc32(t) != spec["crc32"]:
        raise _error(path, f"tensor {key!r} is corrupt: its checksum does not match the one saved")
    return t


def _decode(
    path: Path, node: Any, tensors: dict[str, torch.Tensor], prefix: str, claimed: set[str]
) -> Any:
    where = f"part {prefix[:-1]!r}" if prefix else "the capture"
    if not isinstance(node, dict) or node.get("structure") not in _STRUCTURES:
        found = node.get("structure") if isinstance(node, dict) else node
        raise _error(
            path,
            f"{where} has an unknown structure {found!r} (oculi reads {', '.join(_STRUCTURES)})",
        )
    structure = node["structure"]
    if structure == "FullCapture":
        parts = node.get("parts")
        if not isinstance(parts, dict) or not set(parts) <= set(_PARTS):
            raise _error(
                path, f"a FullCapture's parts must be among {', '.join(_PARTS)}, got {parts!r}"
            )
        built = {}
        for name, part in parts.items():
            if part is None:
                continue
            expected = _PARTS[name].__name__
            if not isinstance(part, dict) or part.get("structure") != expected:
                got = part.get("structure") if isinstance(part, dict) else part
                raise _error(path, f"FullCapture part {name!r} holds {got!r}, expected {expected}")
            built[name] = _decode(path, part, tensors, f"{prefix}{name}.", claimed)
        return FullCapture(**built, metadata=_metadata(path, node))
    layers, attrs = _layers(path, node), node.get("attrs")
    cls = _STRUCTURES[structure]
    allowed_tensors = _LOGIT_TENSORS if cls is LogitCapture else _tensor_fields(cls)
    allowed_attrs = _LOGIT_ATTRS if cls is LogitCapture else _attr_fields(cls)
    names = node.get("tensors")
    if not isinstance(names, list) or not set(names) <= set(allowed_tensors):
        raise _error(
            path,
            f"{where}: a {structure} holds tensors among {', '.join(allowed_tensors)}, got {names!r}",
        )
    if not isinstance(attrs, dict) or not set(attrs) <= set(allowed_attrs):
        raise _error(
            path,
            f"{where}: a {structure} has attributes among {', '.join(allowed_attrs)}, got {attrs!r}",
        )
    values: dict[str, Any] = {}  # keyword arguments of cls, checked against its fields above
    for name in names:
        if prefix + name not in tensors:
            raise _error(path, f"{where}: tensor {prefix + name!r} is missing")
        values[name] = tensors[prefix + name]
        claimed.add(prefix + name)
    metadata = _metadata(path, node)
    problem = _shape_problem(
        structure, values, layers, attrs, batched=not metadata.get("single", True)
    )
    if problem:
        raise _error(path, f"{where}: {problem}")
    if cls is LogitCapture:
        needed = [
            n
            for n in ("normalized", "top_k_values", "top_k_indices", "logsumexp")
            if n not in values
        ]
        if needed:
            raise _error(path, f"{where}: a LogitCapture needs {', '.join(needed)}")
        topk = (values.pop("top_k_values"), values.pop("top_k_indices"), values.pop("logsumexp"))
        return LogitCapture(layers=layers, **attrs, **values, metadata=metadata, _topk=topk)
    return cls(layers=layers, **attrs, **values, metadata=metadata)


def _layers(path: Path, node: dict[str, Any]) -> tuple[int, ...]:
    layers = node.get("layers")
    if (
        not isinstance(layers, list)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        or len(set(layers)) != len(layers)
    ):
        raise _error(path, f"corrupt metadata: layers must be distinct ints, got {layers!r}")
    return tuple(layers)


def _metadata(path: Path, node: dict[str, Any]) -> dict[str, Any]:
    metadata = node.get("metadata", {})
    if not isinstance(metadata, dict):
        raise _error(path, f"corrupt metadata: 'metadata' must be an object, got {metadata!r}")
    return metadata


def _shape_problem(structure, values, layers, attrs, *, batched: bool) -> str | None:
    """What is wrong with the tensors' shapes given their dimension names, or ``None``.

    ``L`` is bound by the layers and ``H``/``Hkv``/``D``/``K`` by the attributes (when set);
    the other names by their first use.
    """
    bound: dict[str, int] = {"L": len(layers)}
    for dim, attr in (("H", "n_heads"), ("Hkv", "n_kv_heads"), ("D", "head_dim"), ("K", "top_k")):
        if isinstance(attrs.get(attr), int) and attrs[attr] > 0:
            bound[dim] = attrs[attr]
    for name, t in values.items():
        dims = _DIMS[structure].get(name, ("L",))
        dims = ("B", *dims) if batched else dims
        kept = (
            f"{name} has shape {list(t.shape)}, but a {structure} keeps it as [{', '.join(dims)}]"
        )
        if t.dim() < len(dims) or (name in _DIMS[structure] and t.dim() != len(dims)):
            return kept
        for dim, size in zip(dims, t.shape):
            if bound.setdefault(dim, size) != size:
                return f"{kept} and {dim} is {bound[dim]} here (layers {list(layers)})"
    return None
