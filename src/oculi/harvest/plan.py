"""The harvest plan: which arrays, how wide, how chunked, and the work units that fill them.

::

    config = HarvestConfig(sites=("resid_post",), layers=(0, 3), batch_tokens=4096)
    plan = make_plan(adapter, config, tokens)
    plan.arrays        # (ArraySpec('resid_post', 0, width=640), ...)
    plan.unit_rows     # rows per unit = rows per shard of every array
    plan.unit(0)       # Unit(index=0, start=0, stop=8192)

Every array has ``n_tokens`` rows and the same row chunking; a unit covers exactly one shard
of every array (``unit_rows`` rows; the last unit the rest), so units never share a file and
can be written by different processes without coordination.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from oculi.capture.sites import SITE_KINDS, check_kind
from oculi.errors import InputError

if TYPE_CHECKING:
    from oculi.harvest.prompts import Tokens
    from oculi.models.adapter import Adapter

# numpy names of the storage dtypes zarr can hold (bfloat16 has no numpy dtype)
STORAGE_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.float64: "float64"}
_CHUNK_TARGET = 4 << 20  # bytes per chunk of the widest array (1-16 MB)
_UNIT_BUDGET = 256 << 20  # bytes of one unit's buffers over all arrays (host memory)
LATENT_PREFIX = "sae."  # an SAE's latents are the array ("sae.<name>", layer)
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class HarvestConfig:
    """What to harvest and how to store it (validated; stored in the manifest).

    Attributes:
        sites: site kinds (``"resid_post"``, ``"mlp_out"``, ``"z"``...; not ``"pattern"``,
            whose width varies with the prompt).
        layers: layer indices (non-negative, normalised by the caller).
        batch_tokens: token budget of one forward pass (``batch size x longest prompt``).
        storage_dtype: numpy name of the stored dtype.
        compression: ``None`` (raw, fastest) or ``"zstd"``.
        chunk_rows: rows per chunk (``None``: ~4 MB chunks of the widest array).
        unit_rows: rows per work unit and shard (``None``: ~256 MB of buffers per unit),
            a multiple of ``chunk_rows``.
        split: held-out fraction of prompts (``"test"`` in the index), or a hash of the
            per-prompt labels given.
        seed: seed of the held-out choice.
        saes: ``(name, fingerprint)`` of each SAE whose latents are stored as the array
            ``("sae.<name>", layer)`` (the fingerprint hashes its weights, so a resume with
            another SAE is refused).
    """

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    batch_tokens: int = 8192
    storage_dtype: str = "float32"
    compression: Literal["zstd"] | None = None
    chunk_rows: int | None = None
    unit_rows: int | None = None
    split: float | str = 0.0
    seed: int = 0
    max_length: int | None = field(default=None)
    saes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not self.sites and not self.saes:
            raise InputError("sites is empty; name at least one site, e.g. sites=['resid_post']")
        names = [name for name, _ in self.saes]
        for name in names:
            if not _NAME.match(name):
                raise InputError(
                    f"SAE name {name!r} is not a folder name; use letters, digits, '_' and '-'"
                )
        for site in self.sites:
            kind = check_kind(site)
            if kind.width == "pos":
                raise InputError(
                    f"site {site!r} is not harvestable: its width is the prompt length; "
                    "harvest 'q' and 'k' and compute patterns from them"
                )
        if len(set(self.sites)) != len(self.sites):
            raise InputError(f"sites {list(self.sites)} name a site twice")
        if not self.layers:
            raise InputError("layers is empty; name at least one layer")
        for name in ("batch_tokens", "chunk_rows", "unit_rows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if self.compression not in (None, "zstd"):
            raise InputError(f"compression must be None or 'zstd', got {self.compression!r}")
        if self.storage_dtype not in STORAGE_DTYPES.values():
            raise InputError(
                f"storage_dtype {self.storage_dtype!r} cannot be stored; use one of "
                f"{', '.join(STORAGE_DTYPES.values())} (zarr has no bfloat16)"
            )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.saes:  # stores without SAEs keep the manifest they always had
            out.pop("saes")
        return out


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: ``(site, layer)``, ``[n_tokens, width]``.

    Per-head sites are stored with heads flattened: head ``h`` is columns
    ``h * d : (h + 1) * d`` (``heads`` says how many).
    """

    site: str
    layer: int
    width: int
    heads: int | None = None

    @property
    def name(self) -> str:
        """Its path in the zarr hierarchy: ``"<site>/<layer>"``."""
        return f"{self.site}/{self.layer}"


@dataclass(frozen=True)
class Unit:
    """A work unit: rows ``start:stop`` of every array (one shard each)."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HarvestPlan:
    """Everything a worker needs besides the model: arrays, chunking, units, token ids."""

    config: HarvestConfig
    arrays: tuple[ArraySpec, ...]
    n_tokens: int
    chunk_rows: int
    unit_rows: int
    itemsize: int
    sae_modules: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def n_units(self) -> int:
        return -(-self.n_tokens // self.unit_rows)

    def unit(self, k: int) -> Unit:
        start = k * self.unit_rows
        return Unit(k, start, min(start + self.unit_rows, self.n_tokens))

    def units(self) -> list[Unit]:
        return [self.unit(k) for k in range(self.n_units)]

    @property
    def requests(self) -> dict[str, tuple[int, ...]]:
        """``{site: layers}`` for the capture engine: one forward records them all (the
        SAEs' sites too)."""
        out = {site: set(self.config.layers) for site in self.config.sites}
        for sae in self.sae_modules:
            out.setdefault(sae.site, set()).add(sae.layer)
        return {site: tuple(sorted(layers)) for site, layers in out.items()}


def array_specs(adapter: Adapter, sites: Sequence[str], layers: Sequence[int]) -> list[ArraySpec]:
    """The ``(site, layer)`` arrays and their widths, read from the adapter's sizes."""
    widths = {"d_model": adapter.d_model, "d_mlp": adapter.d_mlp, "d_head": adapter.d_head}
    out: list[ArraySpec] = []
    for site in sites:
        kind = SITE_KINDS[site]
        heads = (adapter.n_kv_heads if kind.kv else adapter.n_heads) if kind.per_head else None
        width = widths[kind.width] * (heads or 1)
        out.extend(ArraySpec(site, layer, width, heads) for layer in layers)
    return out


def _pow2_floor(x: float) -> int:
    return 1 << max(int(np.floor(np.log2(max(x, 1.0)))), 0)


def make_plan(
    adapter: Adapter, config: HarvestConfig, tokens: Tokens, saes: Sequence[Any] = ()
) -> HarvestPlan:
    """Chunking and units for ``config`` over ``tokens`` (``saes``: the SAEs named in
    ``config.saes``, in order, bound to resolved layers).

    Default chunking: chunks of ~4 MB of the widest array (a power of two of rows); units of
    as many chunks as fit ~256 MB of buffers for all arrays together (at least one chunk).
    """
    arrays = array_specs(adapter, config.sites, config.layers)
    arrays += [
        ArraySpec(LATENT_PREFIX + name, sae.layer, sae.d_sae)
        for (name, _), sae in zip(config.saes, saes)
    ]
    itemsize = np.dtype(config.storage_dtype).itemsize
    widest = max(a.width for a in arrays) * itemsize
    chunk_rows = config.chunk_rows or _pow2_floor(_CHUNK_TARGET / widest)
    if config.unit_rows is not None:
        if config.unit_rows % chunk_rows:
            raise InputError(
                f"unit_rows={config.unit_rows} must be a multiple of chunk_rows={chunk_rows}"
            )
        unit_rows = config.unit_rows
    else:
        row_bytes = sum(a.width for a in arrays) * itemsize
        unit_rows = chunk_rows * max(1, int(_UNIT_BUDGET // (row_bytes * chunk_rows)))
    n = tokens.n_tokens
    # small harvests: no point in chunks or units longer than the data
    chunk_rows = min(chunk_rows, max(n, 1))
    unit_rows = min(unit_rows, -(-n // chunk_rows) * chunk_rows)
    return HarvestPlan(config, tuple(arrays), n, chunk_rows, unit_rows, itemsize, tuple(saes))
