"""Activation records and their files: safe formats by default, pickle only when asked.

::

    save_records(record, "acts.safetensors")          # or .npz, .pt, .json (metadata only)
    save_records(records, "acts.pkl")                  # pickle: asked for by the suffix
    load_records("acts.safetensors")
    load_records("acts.pkl", allow_pickle=True)        # refused without allow_pickle

Tensor formats store, per record ``i``, ``{i}/input_ids``, ``{i}/layer/{name}``,
``{i}/attn/{name}`` and ``{i}/logits``, plus a JSON header (prompts, tokens, generated text,
and the format's name and version).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oculi.capture.io.files import write_atomically
from oculi.errors import CaptureFileError, InputError

FORMAT = "oculi-activations"
VERSION = 1
SUFFIXES = {".safetensors": "safetensors", ".npz": "npz", ".pt": "pt", ".json": "json",
            ".pkl": "pickle", ".pickle": "pickle"}  # fmt: skip


@dataclass
class ActivationRecord:
    """Activations of one prompt (or of one generated sequence).

    Attributes:
        prompt: the text.
        tokens: the tokens fed, as strings (for a generation: the prompt's and the generated
            ones except the last).
        input_ids: ``[T]`` their ids.
        layer_activations: decoder-layer module name (``"model.layers.5"``) -> the residual
            leaving that layer, ``[T, d_model]``.
        attentions: layer module name -> attention pattern ``[H, T, T]`` (when asked for).
        logits: ``[T, V]`` final logits (when asked for).
        generated_text: the continuation, for records made by ``generate``.
    """

    prompt: str
    tokens: list[str]
    input_ids: torch.Tensor
    layer_activations: dict[str, torch.Tensor]
    attentions: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    generated_text: str | None = None

    def residual(self) -> torch.Tensor:
        """All layers stacked, ``[L, T, d_model]``."""
        return torch.stack(list(self.layer_activations.values()))

    def header(self) -> dict[str, Any]:
        """Everything but the tensors, plus their shapes."""
        return {
            "prompt": self.prompt,
            "tokens": list(self.tokens),
            "generated_text": self.generated_text,
            "layers": list(self.layer_activations),
            "attention_layers": list(self.attentions),
            "has_logits": self.logits is not None,
            "shapes": {k: list(v.shape) for k, v in self.tensors().items()},
        }

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {f"{prefix}input_ids": self.input_ids}
        out.update({f"{prefix}layer/{k}": v for k, v in self.layer_activations.items()})
        out.update({f"{prefix}attn/{k}": v for k, v in self.attentions.items()})
        if self.logits is not None:
            out[f"{prefix}logits"] = self.logits
        return out

    @classmethod
    def from_parts(cls, head: dict[str, Any], tensors: dict[str, Any], i: int) -> ActivationRecord:
        def get(key: str) -> torch.Tensor:
            return torch.as_tensor(tensors[f"{i}/{key}"])

        return cls(
            prompt=head["prompt"],
            tokens=list(head["tokens"]),
            input_ids=get("input_ids"),
            layer_activations={k: get(f"layer/{k}") for k in head["layers"]},
            attentions={k: get(f"attn/{k}") for k in head["attention_layers"]},
            logits=get("logits") if head["has_logits"] else None,
            generated_text=head.get("generated_text"),
        )


def _format(path: Path, format: str | None) -> str:
    """``format``, else the suffix's (none: safetensors); a suffix of another format, or an
    unknown one without ``format``, is refused (:func:`load_records` reads by the suffix)."""
    suffix = path.suffix.lower()
    implied = SUFFIXES.get(suffix)
    accepted = ", ".join(SUFFIXES)
    if format is None:
        if suffix and implied is None:
            raise InputError(
                f"cannot tell the activation file format of '{path}' from its suffix "
                f"{path.suffix!r}; use one of {accepted}, or pass format="
            )
        return implied or "safetensors"
    if format not in set(SUFFIXES.values()):
        raise InputError(
            f"format {format!r} is not one of {', '.join(sorted(set(SUFFIXES.values())))}"
        )
    if implied is not None and implied != format:
        raise InputError(
            f"the suffix {path.suffix!r} of '{path}' means format={implied!r}, but "
            f"format={format!r} was given; make them agree (suffixes: {accepted})"
        )
    return format


def save_records(
    records: ActivationRecord | list[ActivationRecord],
    path: str | os.PathLike,
    format: str | None = None,
) -> Path:
    """Write one record or a list to ``path`` (see the module docstring); returns the path.

    The file is written whole or not at all (:func:`oculi.capture.io.files.write_atomically`):
    a full disk leaves an existing file as it was.

    Raises:
        InputError: no records, or an unknown ``format``.
        FileWriteError: a missing or read-only folder, or a failed write; names ``path``.

    Example::

        save_records([analyzer.extract_activations(p) for p in prompts], "acts.safetensors")
    """
    single = isinstance(records, ActivationRecord)
    items: list[Any] = [records] if isinstance(records, ActivationRecord) else list(records)
    if not items or not all(isinstance(r, ActivationRecord) for r in items):
        raise InputError("save_activations takes an ActivationRecord or a non-empty list of them")
    file = Path(path).expanduser()
    fmt = _format(file, format)
    meta = {"format": FORMAT, "version": VERSION, "single": single,
            "records": [r.header() for r in items]}  # fmt: skip
    tensors = {k: v.detach().cpu().contiguous() for i, r in enumerate(items)
               for k, v in r.tensors(f"{i}/").items()}  # fmt: skip
    write_atomically(
        path, lambda tmp: _WRITERS[fmt](tmp, meta, tensors, records), overwrite=True,
        what="activation records",
    )  # fmt: skip
    return file


def _write_json(tmp: Path, meta: dict, tensors: dict, records: Any) -> None:
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")


def _write_safetensors(tmp: Path, meta: dict, tensors: dict, records: Any) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata={"oculi": json.dumps(meta)})


def _write_npz(tmp: Path, meta: dict, tensors: dict, records: Any) -> None:
    import numpy as np

    arrays: dict[str, Any] = {k: v.numpy() for k, v in tensors.items()}
    with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a name
        np.savez_compressed(fh, __meta__=np.array(json.dumps(meta)), **arrays)


def _write_pt(tmp: Path, meta: dict, tensors: dict, records: Any) -> None:
    torch.save({"meta": json.dumps(meta), "tensors": tensors}, tmp)


def _write_pickle(tmp: Path, meta: dict, tensors: dict, records: Any) -> None:
    import pickle

    with open(tmp, "wb") as fh:
        pickle.dump(records, fh)


# each writes the whole file to the temporary path write_atomically hands it
_WRITERS = {"json": _write_json, "safetensors": _write_safetensors, "npz": _write_npz,
            "pt": _write_pt, "pickle": _write_pickle}  # fmt: skip


def _bad(file: Path, what: str) -> CaptureFileError:
    return CaptureFileError(f"{file}: {what}")


def load_records(
    path: str | os.PathLike, *, allow_pickle: bool = False
) -> ActivationRecord | list[ActivationRecord]:
    """Read what :func:`save_records` wrote; pickle only with ``allow_pickle=True``.

    ::

        records = load_records("acts.safetensors")     # what save_records wrote, tensors [T, d]
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no activation file at {str(path)!r}")
    fmt = SUFFIXES.get(file.suffix.lower())
    if fmt == "pickle":
        if not allow_pickle:
            raise _bad(file, "is a pickle, which can run code when loaded; pass "
                       "allow_pickle=True only for files you trust")  # fmt: skip
        import pickle

        with open(file, "rb") as f:
            return pickle.load(f)  # noqa: S301 - explicitly allowed by the caller
    if fmt == "json":
        raise _bad(file, "JSON holds only metadata and shapes; save as .safetensors, .npz or "
                   ".pt to load tensors back")  # fmt: skip
    try:
        meta, tensors = _read_tensors(file, fmt)
    except CaptureFileError:
        raise
    except Exception as exc:  # a truncated or foreign file: name it and say what broke
        raise _bad(file, f"not a readable {fmt or 'activation'} file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise _bad(file, f"not an oculi activation file (format {meta.get('format')!r})")
    records = [ActivationRecord.from_parts(h, tensors, i) for i, h in enumerate(meta["records"])]
    return records[0] if meta.get("single") else records


def _read_tensors(file: Path, fmt: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    if fmt == "npz":
        import numpy as np

        with np.load(file, allow_pickle=False) as data:
            return json.loads(str(data["__meta__"])), {k: data[k] for k in data.files}
    if fmt == "pt":
        blob = torch.load(file, weights_only=True, map_location="cpu")
        return json.loads(blob["meta"]), blob["tensors"]
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("oculi", "{}"))
        return meta, {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
