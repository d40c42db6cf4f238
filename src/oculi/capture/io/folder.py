"""Capture folders: a capture too big for memory, written one layer at a time, read memory-mapped.

A capture streamed to disk (``adapter.capture_full(ids, ..., stream_to="run/long")``) is a
folder oculi owns::

    run/long/
      oculi-capture.json     the marker: format, structure, and where each tensor lies
      pattern.safetensors    one file per recorded site [B, n_layers, ...] (plain safetensors:
      q.safetensors          safetensors.safe_open reads them too)
      head_out.safetensors   a site derived after the forward, written a layer at a time
      extras.safetensors     the rest computed after it (final norm, the lens's normalised
                             residual)

Each site's file gets its header and its full size (sparse) when the site's first layer is
recorded, then every layer (a pattern: every block of query rows) is written in place as the
forward produces it and flushed out of the process's memory (``msync`` and
``madvise(MADV_DONTNEED)`` on a shared mapping), so the resident memory stays one layer's
worth whatever the capture's size. The folder is built under a hidden name beside its target
(``.long.<pid>-<hex>.tmp``) and renamed into place only when complete: a failure or Ctrl-C
removes it and leaves no half-written capture. An existing target is replaced only when it is
an oculi capture folder (its marker file says so) and ``overwrite`` is true; oculi never
removes a folder it did not write.

``oculi-capture.json`` holds the capture's structure as :mod:`oculi.capture.io.codec` encodes
it, and per tensor ``{"file", "offset", "dtype", "shape"}``. :func:`load_folder` (and
:func:`oculi.load_capture` given a folder) maps each file copy-on-write (``torch.from_file``:
pages are read from disk as they are touched, and writing to a loaded tensor never changes
the file) and rebuilds the capture around those tensors.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import secrets
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from oculi.capture.io.files import fsync_folder, fsync_tree, user_path
from oculi.errors import FileWriteError, OutputExistsError

MARKER = "oculi-capture.json"
FOLDER_FORMAT = "oculi-capture-folder"
FOLDER_VERSION = 1
EXTRAS = "extras.safetensors"

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def is_capture_folder(path: Path) -> bool:
    """Whether ``path`` is a folder oculi wrote (it holds the marker file)."""
    return path.is_dir() and (path / MARKER).is_file()


class MappedFile:
    """One site's safetensors file, mapped shared and writable while the capture is recorded.

    ``tensor`` is ``[*shape]`` over the file's data; :meth:`release` writes a written range
    back to the file and drops its pages from the process (they stay in the page cache).
    """

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        numel = 1
        for n in shape:
            numel *= n
        size = torch.empty((), dtype=dtype).element_size()
        header = {
            name: {
                "dtype": _DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [0, numel * size],
            },
            "__metadata__": {"format": FOLDER_FORMAT},
        }
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes
        self.path = path
        self.start = 8 + len(raw)
        total = self.start + numel * size
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(total)  # sparse until written
        with open(path, "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), total)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, offset=self.start, count=numel * size)
        self.tensor = flat.view(dtype).view(shape) if numel else torch.empty(shape, dtype=dtype)

    def close(self) -> None:
        """Unmap the file (the tensor must not be used after)."""
        self.tensor = torch.empty(0)
        with contextlib.suppress(BufferError):  # a view still alive: it closes with the view
            self._map.close()

    def release(self, view: torch.Tensor) -> None:
        """Drop the pages of ``view`` (a part of :attr:`tensor` just written) from the
        process's resident memory. On a shared file mapping ``MADV_DONTNEED`` only unmaps
        them: the written data stays in the page cache, which the kernel writes to the file
        (and :func:`finish_folder` flushes)."""
        page = mmap.PAGESIZE
        for first, last in _spans(view, self.tensor.data_ptr() - self.start):
            lo = first // page * page
            hi = min(len(self._map), -(-last // page) * page)
            if hi > lo:
                self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _spans(view: torch.Tensor, base: int) -> list[tuple[int, int]]:
    """Byte ranges ``[first, last)`` relative to ``base`` that ``view`` covers: one per
    contiguous piece (a block of pattern rows is one piece per batch row and head)."""
    if not view.numel():
        return []
    if view.is_contiguous() or view.dim() == 1:
        extent = sum((n - 1) * st for n, st in zip(view.shape, view.stride(), strict=True))
        first = view.data_ptr() - base
        return [(first, first + (extent + 1) * view.element_size())]
    return [span for i in range(view.shape[0]) for span in _spans(view[i], base)]


def data_span(t: torch.Tensor, files: dict[str, MappedFile]) -> tuple[str, int] | None:
    """``(file name, byte offset)`` where the contiguous tensor ``t`` lies in one of
    ``files``, or ``None`` (a tensor computed in memory)."""
    if not t.is_contiguous():
        return None
    for name, f in files.items():
        if not f.tensor.numel():
            continue
        if t.untyped_storage().data_ptr() == f.tensor.untyped_storage().data_ptr():
            return name, f.start + t.data_ptr() - f.tensor.data_ptr()
    return None


def temporary_folder(path: str | os.PathLike, *, overwrite: bool) -> tuple[Path, Path, str]:
    """``(target, new hidden folder beside it, the target as given)``, checked: the parent
    exists, the target is absent or (with ``overwrite``) an oculi capture folder.

    Raises:
        FileWriteError: a missing parent folder, a file or a folder oculi did not write at
            the target, or a parent that is not writable.
        OutputExistsError: an oculi capture folder at the target and ``overwrite=False``.
    """
    real, shown = user_path(path)
    prefix = f"cannot stream the capture to {shown}"
    if not real.parent.is_dir():
        raise FileWriteError(
            f"{prefix}: the folder '{real.parent}' does not exist (oculi does not create "
            "folders; make it first, e.g. os.makedirs(folder, exist_ok=True))"
        )
    if real.exists() and not is_capture_folder(real):
        what = "a file" if not real.is_dir() else "a folder oculi did not write (no " + MARKER + ")"
        raise FileWriteError(f"{prefix}: it is {what}; oculi replaces only its own capture folders")
    if real.exists() and not overwrite:
        raise OutputExistsError(
            f"{prefix}: a capture folder is there and overwrite=False; pass overwrite=True"
        )
    tmp = real.parent / f".{real.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise FileWriteError(f"{prefix}: {exc.strerror or exc}") from None
    return real, tmp, shown


def finish_folder(tmp: Path, real: Path, marker: dict[str, Any], keep: set[str]) -> None:
    """Write the marker into ``tmp``, drop files no tensor lies in, flush, and rename ``tmp``
    to ``real`` (replacing an oculi capture folder there)."""
    for f in tmp.iterdir():
        if f.name not in keep:
            f.unlink()
    (tmp / MARKER).write_text(json.dumps(marker))
    fsync_tree(tmp)
    old = None
    if real.exists():  # checked to be ours by temporary_folder
        old = real.parent / f".{real.name}.{os.getpid()}-{secrets.token_hex(4)}.old"
        os.rename(real, old)
    os.rename(tmp, real)
    fsync_folder(real.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_folder(tmp: Path) -> None:
    """Remove a hidden folder this process created (a failed or interrupted capture)."""
    shutil.rmtree(tmp, ignore_errors=True)


def load_folder(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(marker JSON, tensors mapped copy-on-write)`` of a capture folder.

    Raises:
        ValueError: a marker of another format or a newer version, a file shorter than its
            tensors (the message says which).
    """
    meta = json.loads((path / MARKER).read_text())
    if meta.get("format") != FOLDER_FORMAT:
        raise ValueError(f"{MARKER} is not an oculi capture folder's marker")
    if int(meta.get("format_version", 0)) > FOLDER_VERSION:
        raise ValueError(
            f"written by a newer oculi (folder format {meta['format_version']}, this oculi reads "
            f"up to {FOLDER_VERSION}); upgrade oculi"
        )
    mapped: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, spec in meta["tensors"].items():
        file = path / spec["file"]
        if spec["file"] not in mapped:
            size = file.stat().st_size
            mapped[spec["file"]] = torch.from_file(
                str(file), shared=False, size=size, dtype=torch.uint8
            )
        raw = mapped[spec["file"]]
        dtype = _NAMES[spec["dtype"]]
        shape = [int(n) for n in spec["shape"]]
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if spec["offset"] + nbytes > raw.numel():
            raise ValueError(
                f"{spec['file']} is truncated: {key!r} needs bytes up to "
                f"{spec['offset'] + nbytes}, the file has {raw.numel()}"
            )
        tensors[key] = raw[spec["offset"] : spec["offset"] + nbytes].view(dtype).view(shape)
    return meta, tensors


def write_extras(tmp: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write what was computed after the forward into the hidden folder's extras file."""
    from safetensors.torch import save_file

    save_file(tensors, tmp, metadata={"format": FOLDER_FORMAT})


def span_of_extras(path: Path) -> dict[str, int]:
    """Byte offset of each tensor's data in a safetensors file (its header read)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {
        key: 8 + n + spec["data_offsets"][0]
        for key, spec in header.items()
        if key != "__metadata__"
    }
