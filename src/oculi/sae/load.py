"""Loading an SAE by path: the layout is recognised by the files it holds.

::

    sae = oculi.sae.load_sae("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82")
    sae = oculi.sae.load_sae("runs/sparsify/layers.6")           # one hook point
    saes = oculi.sae.load_saes("runs/sparsify")                   # {"layers.6": SAE, ...}

========================================  ==================================================
files                                     layout
========================================  ==================================================
a ``.safetensors`` file with oculi's      oculi (:mod:`oculi.sae.io`)
header, or a folder with ``sae.safetensors``
whose header is oculi's
``cfg.json`` + ``sae_weights.safetensors``  SAELens
``cfg.json`` + ``sae.safetensors``           sparsify
``params.npz`` (or the file itself)        Gemma Scope
========================================  ==================================================

Nothing is unpickled: safetensors and ``np.load(allow_pickle=False)`` only. A path that fits
none of them raises :class:`~oculi.sae.io.SAEFormatError` listing what it holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from oculi.capture.io.files import user_path
from oculi.sae.formats import (
    GEMMA_SCOPE,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    read_gemma_scope,
    read_saelens,
    read_sparsify,
)
from oculi.sae.io import FORMAT, SAEFormatError, load_oculi, read_header
from oculi.sae.model import SAE


def detect(path: Path) -> str:
    """``"oculi"``, ``"saelens"``, ``"sparsify"`` or ``"gemma_scope"``; else SAEFormatError."""
    if path.is_file():
        if path.suffix == ".safetensors":
            header = _header(path)
            if header.get("format") == FORMAT:
                return "oculi"
            raise SAEFormatError(
                f"{str(path)!r} is a safetensors file without oculi's SAE header (found header "
                f"keys {sorted(header)}); a SAELens or sparsify SAE is a folder: pass the "
                "folder that holds it and its cfg.json"
            )
        if path.suffix == ".npz":
            return "gemma_scope"
        raise SAEFormatError(
            f"{str(path)!r} is a {path.suffix or 'suffix-less'} file; an SAE is an oculi "
            ".safetensors file, a Gemma Scope params.npz, or a SAELens / sparsify folder"
        )
    names = sorted(p.name for p in path.iterdir())
    files = set(names)
    if SAELENS_CFG in files and SAELENS_WEIGHTS in files:
        return "saelens"
    if SPARSIFY_WEIGHTS in files:
        if _header(path / SPARSIFY_WEIGHTS).get("format") == FORMAT:
            return "oculi"
        if SAELENS_CFG in files:
            return "sparsify"
    if GEMMA_SCOPE in files:
        return "gemma_scope"
    subs = [n for n in names if (path / n).is_dir() and _fits(path / n)]
    hint = (
        f"; it has SAE folders {subs[:8]}{' ...' if len(subs) > 8 else ''}: load one "
        "(load_sae(path / name)) or all (load_saes(path))"
        if subs
        else ""
    )
    shown = names[:12] + (["..."] if len(names) > 12 else [])
    raise SAEFormatError(
        f"no SAE layout fits {str(path)!r}: it holds {shown}{hint}. Recognised: SAELens "
        f"({SAELENS_CFG} + {SAELENS_WEIGHTS}), sparsify ({SAELENS_CFG} + {SPARSIFY_WEIGHTS}), "
        f"Gemma Scope ({GEMMA_SCOPE}), oculi (a .safetensors file saved by SAE.save)"
    )


def _header(path: Path) -> dict[str, str]:
    try:
        return read_header(path) or {}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise SAEFormatError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None


def _fits(path: Path) -> bool:
    try:
        detect(path)
    except SAEFormatError:
        return False
    return True


def load_sae(
    path: str | os.PathLike,
    *,
    site: str | None = None,
    layer: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> SAE:
    """Load an SAE from any layout of the module table.

    Args:
        path: a file or folder (``~`` expanded).
        site, layer: where it reads, when the files do not say (Gemma Scope outside its
            release layout, a sparsify folder of another name) or to override them.
        device, dtype: of the parameters (default: the CPU and the stored dtype).

    Returns:
        The :class:`SAE`, its parameters with ``requires_grad`` off (``.requires_grad_()``
        to fine-tune), ``metadata["source"]`` naming the layout it came from.

    Raises:
        SAEFormatError: no layout fits (the message lists the files found), a damaged file, or
            an option of another library that oculi does not model.
        FileNotFoundError: nothing at ``path``.
    """
    real, shown = user_path(path)
    if not real.exists():
        raise FileNotFoundError(f"no SAE at {shown}: the path does not exist")
    fmt = detect(real)
    options: dict[str, Any] = {"site": site, "layer": layer, "dtype": dtype, "device": device}
    if fmt == "oculi":
        file = real if real.is_file() else real / SPARSIFY_WEIGHTS
        sae = load_oculi(file, device=device, dtype=dtype)
        if site is not None or layer is not None:
            sae.site = site or sae.site
            sae.layer = layer if layer is not None else sae.layer
        return sae
    if fmt == "saelens":
        return read_saelens(real, **options)
    if fmt == "sparsify":
        return read_sparsify(real, **options)
    return read_gemma_scope(real if real.is_file() else real / GEMMA_SCOPE, **options)


def load_saes(
    path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, SAE]:
    """Every SAE in the sub-folders of ``path`` (a sparsify run: one folder per hook point).

    Returns ``{folder name: SAE}`` in name order. Raises :class:`SAEFormatError` when no
    sub-folder holds one.

    ::

        saes = load_saes("path/to/sparsify-run")
        saes["layers.6"].site, saes["layers.6"].layer       # ("resid_post", 6)
    """
    real, shown = user_path(path)
    if not real.is_dir():
        raise FileNotFoundError(f"load_saes takes a folder; {shown} is not one")
    out = {
        p.name: load_sae(p, device=device, dtype=dtype)
        for p in sorted(real.iterdir())
        if p.is_dir() and _fits(p)
    }
    if not out:
        raise SAEFormatError(
            f"no sub-folder of {shown} holds an SAE (it holds {sorted(os.listdir(real))[:12]})"
        )
    return out
