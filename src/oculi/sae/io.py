"""oculi's own SAE file: one safetensors file, the configuration as JSON in its header.

::

    sae.save("l6.safetensors")             # atomic; overwrite=False refuses an existing file
    sae = oculi.sae.load_sae("l6.safetensors")

The header's ``__metadata__`` holds ``{"format": "oculi.sae", "version": "1", "config": ...}``
where the config is everything the constructor takes (kind, widths, ``k``, the site and layer
it reads and writes, whether the input is centred) plus ``metadata``: the model the SAE was
made for (``model``), its training provenance (``training``) and the format it was converted
from, if any (``source``). The tensors are ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``threshold [d_sae]`` and, for a transcoder with a
skip, ``W_skip [d_in, d_out]``. Nothing is pickled; the file is written to a temporary file
beside the target and renamed (:func:`oculi.capture.io.files.write_atomically`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from oculi.capture.interrupts import no_grad
from oculi.capture.io.files import user_path, write_atomically
from oculi.errors import OculiError
from oculi.sae.model import SAE

FORMAT = "oculi.sae"
VERSION = "1"
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


class SAEFormatError(OculiError, ValueError):
    """A path that holds no SAE oculi can read, or a file of a known layout that is damaged
    or uses an option oculi does not model. The message names what was found.

    ::

        load_sae("weights.bin")     # SAEFormatError: 'weights.bin' is a .bin file; an SAE is ...
    """


def config_of(sae: SAE) -> dict[str, Any]:
    """The constructor arguments of ``sae`` (JSON-able), ``metadata`` included."""
    return {
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "d_out": sae.d_out,
        "kind": sae.kind,
        "k": sae.k,
        "site": sae.site,
        "layer": sae.layer,
        "write_site": sae.write_site,
        "skip": sae.W_skip is not None,
        "center_input": sae.center_input,
        "dtype": str(sae.dtype).removeprefix("torch."),
        "metadata": sae.metadata,
    }


def state_of(sae: SAE) -> dict[str, torch.Tensor]:
    """The SAE's tensors by name, contiguous on the CPU."""
    names = TENSORS + (("W_skip",) if sae.W_skip is not None else ())
    return {n: getattr(sae, n).detach().to("cpu").contiguous() for n in names}


def save_sae(sae: SAE, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``sae`` to ``path`` (one ``.safetensors`` file) atomically; returns the path.

    ::

        save_sae(sae, "my_sae.safetensors")
        load_sae("my_sae.safetensors")       # the same SAE, site and layer included
    """
    from safetensors.torch import save_file

    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(config_of(sae), sort_keys=True, default=str),
    }
    tensors = state_of(sae)
    write_atomically(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=header),
        overwrite=overwrite, what="the SAE",
    )  # fmt: skip
    return user_path(path)[0]


def read_header(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file (``None`` when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return f.metadata()


def load_oculi(
    path: Path, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> SAE:
    """Read a file :func:`save_sae` wrote (see the module docstring)."""
    from safetensors.torch import load_file

    header = read_header(path) or {}
    if header.get("format") != FORMAT:
        raise SAEFormatError(
            f"{str(path)!r} is a safetensors file but not an oculi SAE (its header has no "
            f"format={FORMAT!r}; found keys {sorted(header)})"
        )
    if header.get("version") != VERSION:
        raise SAEFormatError(
            f"{str(path)!r} is an oculi SAE of format version {header.get('version')!r}; this "
            f"oculi reads version {VERSION!r}"
        )
    cfg = json.loads(header["config"])
    tensors = load_file(str(path), device="cpu")
    stored = getattr(torch, cfg.pop("dtype"))
    return build(cfg, tensors, dtype=dtype or stored, device=device, where=str(path))


def build(
    cfg: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: str | torch.device | None,
    where: str,
) -> SAE:
    """An :class:`SAE` from constructor arguments and tensors named as oculi names them, with
    ``requires_grad`` off (a loaded SAE is for analysis)."""
    sae = SAE(**cfg, dtype=dtype, device=device)
    want = set(TENSORS) | ({"W_skip"} if sae.W_skip is not None else set())
    if "threshold" not in tensors:
        tensors = {**tensors, "threshold": torch.zeros(sae.d_sae)}
    missing, extra = want - set(tensors), set(tensors) - want
    if missing or extra:
        raise SAEFormatError(
            f"{where}: tensors {sorted(tensors)} do not match a {sae.kind} SAE "
            f"(missing {sorted(missing)}, unexpected {sorted(extra)})"
        )
    with no_grad():
        for name in want:
            param, value = getattr(sae, name), tensors[name]
            if tuple(value.shape) != tuple(param.shape):
                raise SAEFormatError(
                    f"{where}: tensor {name} has shape {list(value.shape)}, expected "
                    f"{list(param.shape)} for d_in={sae.d_in}, d_sae={sae.d_sae}, "
                    f"d_out={sae.d_out}"
                )
            param.copy_(value.to(param.dtype))
    # a loaded SAE is for analysis: no autograd graph behind its latents unless asked
    # (sae.requires_grad_(True) to fine-tune it)
    return sae.requires_grad_(False)
