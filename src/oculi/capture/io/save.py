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
"""The formats ``capture.save(path, format=...)`` writes.

::

    capture.save("run.h5", format="hdf5")    # one of FORMATS
"""
# the file suffixes each format is known by; a pickle is written only when format="pickle"
SUFFIXES = {
    ".safetensors": "safetensors",
    ".npz": "npz",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".json": "json",
    ".pkl": "pickle",
    ".pickle": "pickle",
}
"""File suffix -> the format it selects when ``format=`` is not given.

::

    SUFFIXES[".npz"]            # "npz": capture.save("x.npz") writes np.load's format
"""


def format_for(path: str | os.PathLike, format: str | None) -> str:
    """The format a capture saved at ``path`` is written in: ``format``, else the suffix's.

    ``"x.npz"`` -> ``"npz"``, ``"x.h5"``/``"x.hdf5"`` -> ``"hdf5"``, ``"x.json"`` ->
    ``"json"``, ``"x.safetensors"`` and a name without a suffix -> ``"safetensors"``. A pickle
    is only written when asked for by name (``format="pickle"``), never from a ``.pkl`` suffix
    alone. With ``format=`` given, a suffix of another format is a contradiction; a suffix no
    format has (``.bin``) is accepted there, as the format was said out loud.

    Raises:
        ValueError: an unknown ``format``, a suffix that contradicts it, a suffix no format
            has (without ``format=``), or a pickle suffix without ``format="pickle"``.

    Example::

        format_for("run.npz", None)            # "npz"
        format_for("run.bin", "safetensors")   # "safetensors"
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown capture format {format!r}; choose one of {', '.join(FORMATS)}")
    name = os.fsdecode(os.fspath(path))
    suffix = os.path.splitext(name)[1]
    implied = SUFFIXES.get(suffix.lower())
    accepted = ", ".join(SUFFIXES)
    if format is None:
        if not suffix:
            return "safetensors"
        if implied is None:
            raise ValueError(
                f"cannot tell the capture format of {name!r} from its suffix {suffix!r}; "
                f"use one of {accepted}, or pass format= (one of {', '.join(FORMATS)})"
            )
        if implied == "pickle":
            raise ValueError(
                f"{name!r} asks for a pickle by its suffix; oculi writes pickles only when asked "
                "by name, as loading one can run code: pass format='pickle', or use .safetensors"
            )
        return implied
    if implied is not None and implied != format:
        raise ValueError(
            f"the suffix {suffix!r} of {name!r} means format={implied!r}, but format={format!r} "
            f"was given; make them agree (suffixes: {accepted})"
        )
    return format


def save_capture(
    capture: Any,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``capture`` to ``path``, whole: a temporary file beside it, then renamed.

    Example::

        save_capture(full, "~/runs/eiffel.safetensors", overwrite=False)
        save_capture(full, "eiffel.npz")          # np.load("eiffel.npz")["attention.queries"]

    An existing file is replaced unless ``overwrite=False``. The folder must exist (oculi does
    not create folders). The file gets the mode of any new file (``0o666`` less the umask),
    whatever the format.

    Args:
        capture: an ``AttentionCapture``, ``ResidualCapture``, ``MLPCapture``,
            ``LogitCapture`` or ``FullCapture``.
        path: the file to write (``~`` is expanded); no suffix is added.
        format: ``"safetensors"``, ``"npz"``, ``"hdf5"`` (all three loadable), ``"json"``
            (metadata only) or ``"pickle"`` (loadable only with ``allow_pickle=True``).
            ``None`` (the default) takes it from the suffix: ``.safetensors``, ``.npz``,
            ``.h5``/``.hdf5``, ``.json``; no suffix means safetensors. ``.pkl``/``.pickle``
            need ``format="pickle"`` said explicitly.
        overwrite: replace an existing file (the default); ``False`` refuses to.

    Raises:
        ValueError: an unknown format, a suffix that contradicts ``format``, or (without
            ``format``) a suffix no format has or a pickle suffix; the message lists the
            accepted suffixes (BAD_INPUTS row 42).
        InputError: metadata JSON cannot hold, or a LogitCapture with neither its top-k nor
            an unembedding to compute them.
        FileWriteError: a missing or read-only folder, a folder at ``path``, a failed write;
            the message names ``path`` as given.
        OutputExistsError: (a ``FileExistsError``) ``path`` exists and ``overwrite=False``.
        MissingExtraError: ``format="hdf5"`` without h5py.
    """
    format = format_for(path, format)
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
    """The arrays a saved file would hold, by the same names (bf16/fp8 widened to float32).

    ::

        arrays = capture_to_numpy(adapter.capture_residual(prompt))
        arrays["pre_attn"].shape       # (L, T, d_model), a NumPy array
    """
    return {key: numpy_array(t) for key, t in to_cpu(encode(capture)[1]).items()}
