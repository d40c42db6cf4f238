"""Writing captures: :func:`save_capture` and :func:`capture_to_numpy`."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from oculi.capture.io import (
    hdf5_format,
    json_format,
    npz_format,
    pickle_format,
    safetensors_format,
)
from oculi.capture.io.codec import encode, metadata_problem
from oculi.capture.io.files import write_atomically
from oculi.capture.io.schema import file_metadata, numpy_array, to_cpu
from oculi.errors import InputError

_WRITERS = {
    "safetensors": safetensors_format.write,
    "npz": npz_format.write,
    "hdf5": hdf5_format.write,
    "json": json_format.write,
    "pickle": pickle_format.write,
}
FORMATS = tuple(_WRITERS)


def save_capture(
    capture: Any,
    path: str | os.PathLike,
    *,
    format: str = "safetensors",
    overwrite: bool = True,
) -> None:
    """Write ``capture`` to ``path``, whole: a temporary file beside it, then renamed.

    Example::

        save_capture(full, "~/runs/eiffel.safetensors", overwrite=False)

    An existing file is replaced unless ``overwrite=False``. The folder must exist (oculi does
    not create folders). The file gets the mode of any new file (``0o666`` less the umask),
    whatever the format.

    Args:
        capture: an ``AttentionCapture``, ``ResidualCapture``, ``MLPCapture``,
            ``LogitCapture`` or ``FullCapture``.
        path: the file to write (``~`` is expanded); no suffix is added.
        format: ``"safetensors"`` (loadable, the default), ``"npz"``, ``"hdf5"`` (both
            loadable), ``"json"`` (metadata only) or ``"pickle"`` (loadable only with
            ``allow_pickle=True``).
        overwrite: replace an existing file (the default); ``False`` refuses to.

    Raises:
        ValueError: an unknown format.
        InputError: metadata JSON cannot hold, or a LogitCapture with neither its top-k nor
            an unembedding to compute them.
        FileWriteError: a missing or read-only folder, a folder at ``path``, a failed write;
            the message names ``path`` as given.
        OutputExistsError: (a ``FileExistsError``) ``path`` exists and ``overwrite=False``.
        MissingExtraError: ``format="hdf5"`` without h5py.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown capture format {format!r}; choose one of {', '.join(FORMATS)}")
    node, tensors = encode(capture)
    tensors = to_cpu(tensors)
    try:
        text = json.dumps(file_metadata(node, tensors))
    except (TypeError, ValueError):
        raise InputError(
            "capture metadata must be JSON-serialisable; these entries are not: "
            f"{metadata_problem(capture)} (convert them to lists/str/numbers)"
        ) from None
    write = _WRITERS[format]
    write_atomically(
        path, lambda tmp: write(tmp, text, tensors), overwrite=overwrite, what="capture"
    )


def capture_to_numpy(capture: Any) -> dict[str, np.ndarray]:
    """The arrays a saved file would hold, by the same names (bf16/fp8 widened to float32)."""
    return {key: numpy_array(t) for key, t in to_cpu(encode(capture)[1]).items()}
