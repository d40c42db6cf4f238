"""Long contexts: captures planned, computed a block of positions at a time, streamed to disk.

At 8k-32k tokens a capture of attention patterns outgrows memory twice over: eager attention
materialises ``[B, H, T, T]`` scores and probabilities per layer (4 GiB each for 4 heads at
16,384 tokens in float32), and the patterns of every layer together are that size times the
layers. The memory plan (:func:`oculi.capture.memory.plan_capture`) handles both:

* scores that do not fit: every layer's attention runs a block of query positions at a time
  (:mod:`oculi.capture.blocked`), patterns copied into the result block by block;
* a result that does not fit: with ``stream_to=folder`` the capture is written to a capture
  folder (:mod:`oculi.capture.io.folder`) one layer (one block of pattern rows) at a time as
  the forward runs, and returned memory-mapped from it;
* neither: refused before any forward with the estimate per site, the memory and disk free.

::

    full = adapter.capture_full(ids_16k, attention=CaptureConfig(layers=[3]), residual=None,
                                mlp=None, logits=None, stream_to="runs/long")
    full.attention.patterns          # [1, H, 16384, 16384], memory-mapped from runs/long
    oculi.load_capture("runs/long")  # the same, later, without the model

:func:`plan_stream` is the plan of a streamed capture (what goes to disk, what stays in
memory), :class:`StreamRecorder` the recorder writing to the folder, :func:`stream_capture`
the whole call and :func:`load_streamed` the reader.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oculi.capture.blocked import block_rows
from oculi.capture.engine import Recorder, expand_requests, record
from oculi.capture.inputs import Batch
from oculi.capture.io.folder import (
    EXTRAS,
    FOLDER_FORMAT,
    FOLDER_VERSION,
    MappedFile,
    data_span,
    finish_folder,
    load_folder,
    remove_folder,
    span_of_extras,
    temporary_folder,
    write_extras,
)
from oculi.capture.places import locate
from oculi.errors import MemoryPlanError

Storage = Mapping[str, tuple[torch.dtype | None, "str | torch.device | None"]]


def blocked_forward_bytes(adapter: Any, b: int, t: int, rows: int) -> int:
    """Peak working set of a blocked forward of ``b`` rows over ``t`` tokens (no grad): one
    layer's activations per row (as :func:`oculi.capture.memory.forward_bytes`), one block of
    ``rows`` query positions' scores, the boolean ``[B, 1, T, T]`` mask per attention type
    and one block of it as the additive mask eager attention takes."""
    from oculi.capture.memory import _n_masks, score_bytes

    size = torch.finfo(adapter.dtype).bits // 8
    hidden = t * (8 * adapter.d_model + 3 * adapter.d_mlp)
    hidden += 3 * t * (adapter.n_heads + 2 * adapter.n_kv_heads) * adapter.d_head
    scores = b * adapter.n_heads * min(rows, t) * t * score_bytes(size)
    masks = b * t * t * _n_masks(adapter) + b * min(rows, t) * t * size
    return b * hidden * size + scores + masks


def attention_rows(adapter: Any, b: int, t: int) -> int:
    """Query positions per block for a ``b``-row, ``t``-token forward (scores of one block
    stay under :data:`oculi.capture.blocked.BLOCK_BYTES`)."""
    from oculi.capture.memory import score_bytes

    size = torch.finfo(adapter.dtype).bits // 8
    return min(t, block_rows(b, adapter.n_heads, t, score_bytes(size)))


def site_bytes(
    adapter: Any, requests: Mapping[str, Sequence[int]], storage: Storage | None, b: int, t: int
) -> dict[str, int]:
    """Bytes each recorded kind takes for a ``b``-row, ``t``-token batch (``{kind: bytes}``,
    internal kinds included, derived ones excluded: they are computed after the forward)."""
    from oculi.capture.memory import site_elements

    storage = storage or {}
    out: dict[str, int] = {}
    for kind, layers in expand_requests(adapter, requests).items():
        if locate(kind, adapter).read is None:
            continue
        dtype = storage.get(kind, (None, None))[0] or adapter.dtype
        size = torch.finfo(dtype).bits // 8
        out[kind] = b * len(layers) * site_elements(adapter, kind, t) * size
    return out


def derived_bytes(
    adapter: Any, requests: Mapping[str, Sequence[int]], storage: Storage | None, b: int, t: int
) -> int:
    """Bytes of the kinds computed from others after the forward (``resid_mid`` from
    ``resid_pre`` and ``attn_out``, ``head_out`` from ``z``): written to disk a layer at a
    time too."""
    from oculi.capture.memory import site_elements

    storage = storage or {}
    total = 0
    for kind, layers in requests.items():
        if layers and locate(kind, adapter).read is None and not locate(kind, adapter).absent:
            dtype = storage.get(kind, (None, None))[0] or adapter.dtype
            size = torch.finfo(dtype).bits // 8
            total += b * len(layers) * site_elements(adapter, kind, t) * size
    return total


def describe_sites(sites: Mapping[str, int], requests: Mapping[str, Sequence[int]]) -> str:
    """``"'pattern' (layers 0-17): 4.00 GiB; 'q' (layers [3]): ..."``, largest first."""
    from oculi.capture.memory import _size

    parts = []
    for kind, n in sorted(sites.items(), key=lambda kv: -kv[1]):
        layers = sorted(requests.get(kind, ()))
        if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
            where = f" (layers {layers[0]}-{layers[-1]})"
        else:
            where = f" (layers {layers})" if layers else ""
        parts.append(f"{kind!r}{where}: {_size(n)}")
    return "; ".join(parts)


@dataclass(frozen=True)
class StreamPlan:
    """A streamed capture's plan.

    Attributes:
        rows: query positions per attention block.
        disk: bytes the folder will hold; ``disk_free``: free on its file system.
        need, free: ``{device: bytes}`` of memory, as :class:`~oculi.capture.memory.MemoryPlan`.
        sites: ``{kind: bytes}`` written to disk.
    """

    rows: int
    disk: int
    disk_free: int | None
    need: dict[str, int]
    free: dict[str, int | None]
    sites: dict[str, int]


def plan_stream(
    adapter: Any,
    batch: Batch,
    requests: Mapping[str, Sequence[int]],
    storage: Storage | None,
    folder: Path,
    *,
    free: Mapping[str, int | None] | None = None,
    disk_free: int | None = None,
) -> StreamPlan:
    """The plan of a capture streamed to ``folder``'s file system; refuses what cannot fit.

    Raises:
        MemoryPlanError: the patterns and other sites do not fit on the disk, or the blocked
            forward (plus the sites computed after it) not in memory; the message names each
            site's bytes, the disk's or device's free bytes and what to change.
    """
    from oculi.capture.memory import SHARE, _compute_devices, _size, free_bytes

    b, t = batch.input_ids.shape
    rows = attention_rows(adapter, b, t)
    sites = site_bytes(adapter, requests, storage, b, t)
    disk = sum(sites.values()) + derived_bytes(adapter, requests, storage, b, t)
    if disk_free is None:
        disk_free = shutil.disk_usage(folder).free
    runs_on, transfer = _compute_devices(adapter)
    computing = sorted(set(runs_on) | {str(adapter.device)})
    forward = blocked_forward_bytes(adapter, b, t, rows)
    need = {c: forward + transfer.get(c, 0) for c in computing}
    free = dict(free) if free is not None else {d: free_bytes(d) for d in need}
    listed = describe_sites(sites, expand_requests(adapter, requests))
    if disk > SHARE * disk_free:
        raise MemoryPlanError(
            f"this capture does not fit on the disk of '{folder}': its {b} x {t}-token sites "
            f"need {_size(disk)} ({listed}), {_size(disk_free)} free there (the plan uses at "
            f"most {SHARE:.0%} of it). Try fewer `layers` or sites, a smaller `storage_dtype`, "
            "a shorter input, or stream_to= a folder on a larger disk."
        )
    short = [d for d, n in need.items() if free.get(d) is not None and n > SHARE * free[d]]  # type: ignore[operator]
    if short:
        parts = "; ".join(f"{_size(need[d])} on {d}, {_size(free[d] or 0)} free" for d in short)
        raise MemoryPlanError(
            f"this capture does not fit in memory even streamed to disk: the {t}-token forward, "
            f"a block of {rows} query positions at a time, needs {parts} (the plan uses at most "
            f"{SHARE:.0%} of it; the boolean attention mask alone is "
            f"{_size(b * t * t)} per attention type; the sites go to disk: {listed}). Try a "
            "shorter input or fewer rows per call."
        )
    return StreamPlan(rows, disk, disk_free, need, free, sites)


class StreamRecorder(Recorder):
    """A :class:`~oculi.capture.engine.Recorder` whose buffers are files of a capture folder.

    Each kind's buffer is a shared writable mapping of ``<kind>.safetensors``; after each
    layer (each block of pattern rows) is copied in, its pages leave the process's resident
    memory (:meth:`oculi.capture.io.folder.MappedFile.release`).
    """

    host_streams = False

    def __init__(
        self,
        requests: Mapping[str, Sequence[int]],
        storage: Storage,
        folder: Path,
    ) -> None:
        super().__init__(requests, storage)
        self.folder = folder
        self.files: dict[str, MappedFile] = {}

    def allocate(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = len(self.slots[kind])
        dtype = self.storage.get(kind, (None, None))[0] or like.dtype
        name = f"{kind}.safetensors"
        self.files[name] = MappedFile(self.folder / name, kind, (shape[0], n, *shape[1:]), dtype)
        return self.files[name].tensor

    def derived(self, kind: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        dtype = self.storage.get(kind, (None, None))[0] or like.dtype
        name = f"{kind}.safetensors"
        self.files[name] = MappedFile(self.folder / name, kind, shape, dtype)
        return self.files[name].tensor

    def stored(self, kind: str, layer: int, dst: torch.Tensor) -> None:
        self.files[f"{kind}.safetensors"].release(dst)

    def close(self) -> None:
        """Unmap every file (the buffers must not be used after)."""
        self.buffers.clear()
        for f in self.files.values():
            f.close()


def stream_capture(
    adapter: Any,
    batch: Batch,
    assemble: Any,
    requests: Mapping[str, Sequence[int]],
    storage: Storage,
    path: str | os.PathLike,
    *,
    overwrite: bool = True,
    free: Mapping[str, int | None] | None = None,
    disk_free: int | None = None,
) -> Any:
    """Record ``requests`` into a capture folder at ``path`` and return the capture mapped
    from it.

    ``assemble(recorded) -> capture`` builds the structure (a
    :class:`~oculi.capture.assemble.CapturePlan`'s ``assemble`` bound to the adapter and
    batch). The plan (:func:`plan_stream`) is checked before the folder is created and before
    any forward. The folder is written under a hidden name and renamed into place when
    complete; on any error or interrupt it is removed and no hook stays registered.
    """
    from oculi import __version__
    from oculi.capture.io.codec import encode

    real, shown = Path(os.path.expanduser(os.fspath(path))), os.fspath(path)
    parent = real.parent if real.parent.is_dir() else Path(".")
    plan_stream(adapter, batch, requests, storage, parent, free=free, disk_free=disk_free)
    real, tmp, shown = temporary_folder(path, overwrite=overwrite)
    rec = StreamRecorder(expand_requests(adapter, requests), storage, tmp)
    done = False
    try:
        rows = attention_rows(adapter, *batch.input_ids.shape)
        recorded = record(adapter, batch, requests, storage=storage, rows=rows, recorder=rec)
        capture = assemble(recorded)
        node, tensors = encode(capture, lens_top_k=False)  # the lens stays lazy
        layout: dict[str, dict[str, Any]] = {}
        extras: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            span = data_span(tensor, rec.files)
            if span is None:
                extras[key] = tensor.detach().to("cpu").contiguous()
                continue
            layout[key] = _spec(tensor, *span)
        del capture, recorded, tensors
        if extras:
            write_extras(tmp / EXTRAS, extras)
            offsets = span_of_extras(tmp / EXTRAS)
            layout.update({k: _spec(t, EXTRAS, offsets[k]) for k, t in extras.items()})
        rec.close()
        marker = {
            "format": FOLDER_FORMAT,
            "format_version": FOLDER_VERSION,
            "oculi_version": __version__,
            "structure": node["structure"],
            "capture": node,
            "tensors": layout,
        }
        finish_folder(tmp, real, marker, keep={spec["file"] for spec in layout.values()})
        done = True
    finally:
        if not done:
            rec.close()
            remove_folder(tmp)
    loaded = load_streamed(real)
    _bind(loaded, adapter)
    return loaded


def _spec(tensor: torch.Tensor, file: str, offset: int) -> dict[str, Any]:
    from oculi.capture.io.folder import _DTYPES

    return {
        "file": file,
        "offset": offset,
        "dtype": _DTYPES[tensor.dtype],
        "shape": list(tensor.shape),
    }


def _bind(capture: Any, adapter: Any) -> None:
    """Bind the adapter as an in-memory capture is, the lens's unembedding included."""
    from oculi.capture.structures import bind_adapter

    for name in ("attention", "residual", "mlp", "logits"):
        part = getattr(capture, name, None)
        if part is not None:
            bind_adapter(part, adapter)
    bind_adapter(capture, adapter)
    logits = getattr(capture, "logits", None)
    if logits is not None:  # as in memory: the lens computes beyond the top-k written
        logits.attach_unembedding(adapter)


def load_streamed(path: Path) -> Any:
    """The capture in the capture folder ``path``, its tensors mapped copy-on-write.

    Raises:
        CaptureFileError: not a capture folder, a newer format, a truncated file.
    """
    from oculi.capture.io.codec import decode
    from oculi.capture.io.schema import FileProblem
    from oculi.errors import CaptureFileError

    try:
        meta, tensors = load_folder(path)
        return decode(meta, tensors)
    except (ValueError, KeyError, OSError, FileProblem) as exc:
        raise CaptureFileError(f"cannot load capture folder '{path}': {exc}") from None
