"""Capture structures to and from ``(JSON node, tensors by file key)``.

A node records a structure's class, layers, attributes (heads, ``qk_stage``, top-k...),
metadata and the names of the tensors it holds; a :class:`FullCapture`'s node holds its parts'
nodes, and their tensors are keyed ``"attention.queries"``... A :class:`LogitCapture` is
encoded with its top-k (computed first if needed) but without the unembedding, which belongs
to the model.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from oculi.capture.io.schema import FileProblem, shape_problem
from oculi.capture.lens import LogitCapture
from oculi.capture.structures import (
    AttentionCapture,
    FullCapture,
    MLPCapture,
    ResidualCapture,
    _Capture,
)
from oculi.errors import InputError

Capture = AttentionCapture | ResidualCapture | MLPCapture | LogitCapture | FullCapture
"""Any capture structure ``save`` writes and ``load_capture`` returns.

::

    capture: Capture = oculi.load_capture("run.safetensors")
"""
CAPTURE_TYPES = (AttentionCapture, ResidualCapture, MLPCapture, LogitCapture, FullCapture)
_STRUCTURES: dict[str, type] = {cls.__name__: cls for cls in CAPTURE_TYPES}
PARTS = {
    "attention": AttentionCapture,
    "residual": ResidualCapture,
    "mlp": MLPCapture,
    "logits": LogitCapture,
}
_LOGIT_TENSORS = ("normalized", "final_normalized", "top_k_values", "top_k_indices", "logsumexp")
_LOGIT_ATTRS = ("softcap", "top_k", "chunk_size")


# -- encoding ----------------------------------------------------------------------------
def encode(
    capture: Any, prefix: str = "", *, lens_top_k: bool = True
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(JSON node, tensors by file key)`` for one structure.

    ``lens_top_k=False`` (a capture folder): a :class:`LogitCapture` whose top-k were never
    computed is encoded without them (its node says ``"lazy_top_k": true``); it computes them
    on first use once an unembedding is attached, as in memory.

    Raises:
        TypeError: not a capture structure.
        InputError: shapes that contradict the structure, or a LogitCapture with neither its
            top-k nor an unembedding.
    """
    if isinstance(capture, FullCapture):
        parts: dict[str, dict[str, Any] | None] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name in PARTS:
            part = getattr(capture, name)
            parts[name] = None
            if part is not None:
                parts[name], part_tensors = encode(part, f"{prefix}{name}.", lens_top_k=lens_top_k)
                tensors.update(part_tensors)
        full: dict[str, Any] = {
            "structure": "FullCapture",
            "metadata": capture.metadata,
            "parts": parts,
        }
        if capture.latents is not None:  # stored dense: safetensors and npz hold no sparse
            full["latents"] = len(capture.latents)
            for i, a in enumerate(capture.latents):
                tensors[f"{prefix}latents.{i}"] = a.to_dense() if a.is_sparse else a
        return full, tensors
    lazy = isinstance(capture, LogitCapture) and not lens_top_k and capture._topk is None
    structure, values, attrs = _fields_of(capture, lazy)
    present = {name: t for name, t in values.items() if t is not None}
    batched = not capture.metadata.get("single", True)
    problem = shape_problem(structure, present, capture.layers, attrs, batched=batched)
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
    if lazy:
        node["lazy_top_k"] = True
    return node, {prefix + name: t for name, t in present.items()}


def _fields_of(capture: Any, lazy: bool = False) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(structure name, tensor fields, attribute fields)`` of a part (``lazy``: a lens
    without its top-k)."""
    if isinstance(capture, LogitCapture):
        attrs = {name: getattr(capture, name) for name in _LOGIT_ATTRS}
        if lazy:
            return "LogitCapture", {n: getattr(capture, n) for n in _LOGIT_TENSORS[:2]}, attrs
        if capture._topk is None and capture.unembed is None:
            raise InputError(
                "cannot save this LogitCapture: its top-k were never computed and it has no "
                "unembedding to compute them; call .attach_unembedding(adapter) first"
            )
        values = {name: getattr(capture, name) for name in _LOGIT_TENSORS}
        return "LogitCapture", values, {name: getattr(capture, name) for name in _LOGIT_ATTRS}
    if isinstance(capture, _Capture):
        structure = next(n for n, c in _STRUCTURES.items() if isinstance(capture, c))
        cls = _STRUCTURES[structure]
        values = {name: getattr(capture, name) for name in _tensor_fields(cls)}
        return structure, values, {name: getattr(capture, name) for name in _attr_fields(cls)}
    raise TypeError(
        f"save_capture takes an oculi capture structure ({', '.join(_STRUCTURES)}), "
        f"got {type(capture).__name__}"
    )


def _tensor_fields(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if "Tensor" in str(f.type)]


def _attr_fields(cls: type) -> list[str]:
    tensors = set(_tensor_fields(cls))
    return [f.name for f in fields(cls) if f.name not in tensors | {"layers", "metadata"}]


def metadata_problem(capture: Any) -> str:
    """The metadata entries of ``capture`` (and its parts) that JSON cannot hold."""
    import json

    def json_ok(value: Any) -> bool:
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            return False
        return True

    bad = [
        f"{key!r} ({type(value).__name__})"
        for part in (capture, *(getattr(capture, p, None) for p in PARTS))
        for key, value in (getattr(part, "metadata", None) or {}).items()
        if not json_ok(value)
    ]
    return ", ".join(dict.fromkeys(bad)) or "unknown"


# -- decoding ----------------------------------------------------------------------------
def decode(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Capture:
    """Rebuild the structure a checked file's metadata describes from its tensors.

    Raises:
        FileProblem: an unknown structure, fields it does not have, shapes that contradict
            it, or tensors no structure claims.
    """
    claimed: set[str] = set()
    capture = _decode(meta["capture"], tensors, "", claimed)
    unclaimed = [key for key in meta["tensors"] if key not in claimed]
    if unclaimed:
        raise FileProblem(f"tensors no structure claims: {', '.join(unclaimed)}")
    return capture


def _decode(node: Any, tensors: dict[str, torch.Tensor], prefix: str, claimed: set[str]) -> Any:
    where = f"part {prefix[:-1]!r}" if prefix else "the capture"
    if not isinstance(node, dict) or node.get("structure") not in _STRUCTURES:
        found = node.get("structure") if isinstance(node, dict) else node
        raise FileProblem(
            f"{where} has an unknown structure {found!r} (oculi reads {', '.join(_STRUCTURES)})"
        )
    if node["structure"] == "FullCapture":
        return _decode_full(node, tensors, prefix, claimed)
    structure = node["structure"]
    layers, attrs = _layers(node), node.get("attrs")
    cls = _STRUCTURES[structure]
    allowed_tensors = _LOGIT_TENSORS if cls is LogitCapture else _tensor_fields(cls)
    allowed_attrs = _LOGIT_ATTRS if cls is LogitCapture else _attr_fields(cls)
    names = node.get("tensors")
    if not isinstance(names, list) or not set(names) <= set(allowed_tensors):
        raise FileProblem(
            f"{where}: a {structure} holds tensors among {', '.join(allowed_tensors)}, got {names!r}"
        )
    if not isinstance(attrs, dict) or not set(attrs) <= set(allowed_attrs):
        raise FileProblem(
            f"{where}: a {structure} has attributes among {', '.join(allowed_attrs)}, got {attrs!r}"
        )
    values: dict[str, Any] = {}  # keyword arguments of cls, checked against its fields above
    for name in names:
        if prefix + name not in tensors:
            raise FileProblem(f"{where}: tensor {prefix + name!r} is missing")
        values[name] = tensors[prefix + name]
        claimed.add(prefix + name)
    metadata = _metadata(node)
    batched = not metadata.get("single", True)
    problem = shape_problem(structure, values, layers, attrs, batched=batched)
    if problem:
        raise FileProblem(f"{where}: {problem}")
    if cls is not LogitCapture:
        return cls(layers=layers, **attrs, **values, metadata=metadata)
    needed = [
        n for n in ("normalized", "top_k_values", "top_k_indices", "logsumexp") if n not in values
    ]
    if node.get("lazy_top_k") is True and needed == ["top_k_values", "top_k_indices", "logsumexp"]:
        return LogitCapture(layers=layers, **attrs, **values, metadata=metadata)
    if needed:
        raise FileProblem(f"{where}: a LogitCapture needs {', '.join(needed)}")
    topk = (values.pop("top_k_values"), values.pop("top_k_indices"), values.pop("logsumexp"))
    return LogitCapture(layers=layers, **attrs, **values, metadata=metadata, _topk=topk)


def _decode_full(
    node: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, claimed: set[str]
) -> FullCapture:
    parts = node.get("parts")
    if not isinstance(parts, dict) or not set(parts) <= set(PARTS):
        raise FileProblem(f"a FullCapture's parts must be among {', '.join(PARTS)}, got {parts!r}")
    built = {}
    for name, part in parts.items():
        if part is None:
            continue
        expected = PARTS[name].__name__
        if not isinstance(part, dict) or part.get("structure") != expected:
            got = part.get("structure") if isinstance(part, dict) else part
            raise FileProblem(f"FullCapture part {name!r} holds {got!r}, expected {expected}")
        built[name] = _decode(part, tensors, f"{prefix}{name}.", claimed)
    metadata = _metadata(node)
    n_latents = node.get("latents")
    if n_latents is not None:
        saes = metadata.get("saes")
        if not isinstance(n_latents, int) or not isinstance(saes, list) or len(saes) != n_latents:
            raise FileProblem(
                f"a FullCapture's latents ({n_latents!r}) must match its metadata's saes list"
            )
        keys = [f"{prefix}latents.{i}" for i in range(n_latents)]
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise FileProblem(f"the capture's latents are missing: {', '.join(missing)}")
        claimed.update(keys)
        built["latents"] = [tensors[key] for key in keys]
    return FullCapture(**built, metadata=metadata)


def _layers(node: dict[str, Any]) -> tuple[int, ...]:
    layers = node.get("layers")
    if (
        not isinstance(layers, list)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        or len(set(layers)) != len(layers)
    ):
        raise FileProblem(f"corrupt metadata: layers must be distinct ints, got {layers!r}")
    return tuple(layers)


def _metadata(node: dict[str, Any]) -> dict[str, Any]:
    metadata = node.get("metadata", {})
    if not isinstance(metadata, dict):
        raise FileProblem(f"corrupt metadata: 'metadata' must be an object, got {metadata!r}")
    return metadata
