"""Captures as files: save and load them, export them for NumPy, HDF5 and JSON readers.

::

    full = adapter.capture_full("The Eiffel Tower is in")
    full.save("eiffel.safetensors")                  # or save_capture(full, path)
    full = oculi.load_capture("eiffel.safetensors")  # bit-exact, no model needed
    full.save("eiffel.npz")                          # np.load(...)["attention.patterns"]

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

**Formats from suffixes.** Without ``format=``, the suffix says it: ``.safetensors``,
``.npz``, ``.h5``/``.hdf5``, ``.json`` (no suffix: safetensors). A suffix that contradicts an
explicit ``format=`` (``save("x.npz", format="hdf5")``), an unknown suffix without
``format=``, and ``.pkl`` without ``format="pickle"`` are refused, naming the accepted
suffixes. :func:`load_capture` reads the format from the bytes, so every file loads whatever
its name.

**Exports.** ``format="npz"``: the same tensors as arrays plus a ``"__meta__"`` string holding
the JSON (NumPy has no bf16 or fp8, so those are stored as exact float32 and converted back on
load). ``format="hdf5"`` (``pip install 'oculi[export]'``): one dataset per tensor, the JSON in
the file attribute ``"oculi_capture"``. ``format="json"``: the JSON alone (shapes and dtypes,
no tensor data), for inspection. ``format="pickle"``: only when asked for, and loaded only with
``allow_pickle=True``, because unpickling a file can run any code it contains.

**Paths.** ``~`` is expanded and errors name the path as given. Every format is written to a
temporary file in the target's folder and renamed into place (never half a file), with the
mode any new file gets (``0o666`` less the umask). An existing file is replaced unless
``overwrite=False`` (then ``OutputExistsError``, a ``FileExistsError``); a missing or
read-only folder is a ``FileWriteError`` (an ``OSError``) naming the path: oculi does not
create folders.

The package, bottom up: ``schema`` (the metadata JSON, dimension names, checks), ``files``
(paths and atomic writes), one module per format (``safetensors_format``, ``npz_format``,
``hdf5_format``, ``json_format``, ``pickle_format``), ``codec`` (structures to and from
``(JSON node, tensors)``), then ``save`` and ``load``.
"""

from oculi.capture.io.codec import Capture
from oculi.capture.io.load import load_capture
from oculi.capture.io.save import FORMATS, SUFFIXES, capture_to_numpy, format_for, save_capture
from oculi.capture.io.schema import FORMAT_VERSION, HEADER_KEY, MAGIC

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "HEADER_KEY",
    "MAGIC",
    "SUFFIXES",
    "Capture",
    "capture_to_numpy",
    "format_for",
    "load_capture",
    "save_capture",
]
