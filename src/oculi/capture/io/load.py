"""Reading captures: :func:`load_capture`, which recognises a file's format by its bytes."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from oculi.capture.io import hdf5_format, json_format, npz_format, pickle_format, safetensors_format
from oculi.capture.io.codec import CAPTURE_TYPES, Capture, decode
from oculi.capture.io.files import user_path
from oculi.capture.io.folder import is_capture_folder
from oculi.capture.io.schema import FileProblem, parse_metadata
from oculi.errors import CaptureFileError

_READERS = {
    "safetensors": safetensors_format.read,
    "npz": npz_format.read,
    "hdf5": hdf5_format.read,
}


def load_capture(path: str | os.PathLike, *, allow_pickle: bool = False) -> Capture:
    """Read a capture written by :func:`save_capture` (safetensors, npz or HDF5).

    Example::

        full = oculi.load_capture("eiffel.safetensors")
        full["blocks.3.attn.hook_pattern"]

    The format is recognised from the file's bytes, not its name. Every tensor is checked
    against the metadata (names, dtypes, shapes, checksums) and the shapes against the
    structure (layers, heads, top-k).

    A capture folder written by ``capture*(..., stream_to=folder)`` loads with its tensors
    memory-mapped from its files (:mod:`oculi.capture.io.folder`).

    Args:
        path: the file or capture folder (``~`` is expanded).
        allow_pickle: also read files written with ``format="pickle"``. Unpickling runs
            whatever code the file contains: only for files you trust.

    Raises:
        CaptureFileError: a missing, empty, truncated or corrupt file, one that is not an
            oculi capture, a pickle (unless ``allow_pickle``), a JSON metadata export, or one
            written by a newer oculi. The message names the file as given and the problem.
    """
    real, shown = user_path(path)
    try:
        return _load(real, allow_pickle=allow_pickle)
    except FileProblem as problem:
        raise CaptureFileError(f"cannot load capture file {shown}: {problem}") from None
    except OSError as exc:  # a permission or device error the readers did not name
        raise CaptureFileError(
            f"cannot load capture file {shown}: cannot read it ({exc.strerror or exc})"
        ) from None


def _load(path: Path, *, allow_pickle: bool) -> Capture:
    if is_capture_folder(path):  # streamed to disk: tensors memory-mapped
        from oculi.capture.stream import load_streamed

        return load_streamed(path)
    kind = sniff(path)
    if kind == "json":
        raise FileProblem(json_format.problem(path))
    if kind in ("pickle", "torch-pickle"):
        if not allow_pickle:
            raise FileProblem(pickle_format.REFUSED)
        payload = pickle_format.read(path, kind)
        if isinstance(payload, CAPTURE_TYPES):
            return payload
        text, tensors = pickle_format.payload_parts(payload)
    else:
        text, tensors = _READERS[kind](path)
    return decode(parse_metadata(text, tensors), tensors)


def sniff(path: Path) -> str:
    """The format of ``path`` from its bytes: ``"safetensors"``, ``"npz"``, ``"hdf5"``,
    ``"pickle"``, ``"torch-pickle"`` or ``"json"``.

    A safetensors file is recognised by its whole header parsing as JSON, before any pickle
    test: its first byte is its header length's low byte, which can be 0x80 like a pickle's.
    A file that only *starts* like a safetensors one and also like a pickle (a truncated
    header) counts as a pickle, so it is never unpickled without ``allow_pickle``.

    Raises:
        FileProblem: missing, a folder, empty, a damaged zip, or an unknown format.
    """
    if not path.exists():
        raise FileProblem("no such file")
    if path.is_dir():
        raise FileProblem("it is a directory, not a capture file")
    size = path.stat().st_size
    if size == 0:
        raise FileProblem("the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(hdf5_format.SIGNATURE):
        return "hdf5"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _zip_kind(path)
    safetensors = safetensors_format.probe(path, head, size)
    if safetensors == "valid":
        return "safetensors"
    if pickle_format.looks_like(head):
        return "pickle"
    if safetensors == "damaged":
        return "safetensors"  # its reader names what is wrong with the header
    if head.lstrip()[:1] == b"{":
        return "json"
    raise FileProblem(
        f"not an oculi capture: unrecognised format ({size} bytes, starting {head[:8]!r}); "
        "oculi reads captures saved as safetensors, .npz or HDF5"
    )


def _zip_kind(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise FileProblem(f"corrupt or truncated zip/.npz archive ({exc})") from None
    if any(name.endswith(".pkl") for name in names):
        return "torch-pickle"  # torch.save's zip holds a pickle
    return "npz"
