"""A store checked against its own records: what ``open_harvest`` and a resume trust.

::

    layout = Layout.of(root, manifest)          # the manifest's arrays, rows and units
    check_arrays(layout)                         # zarr.json of every array vs the manifest
    index_problem(layout)                        # index.parquet: rows, size, sha256
    unit_problems(layout, done)                  # every committed unit's shards: exist, size
    content_problems(layout, done, arrays)       # verify: rows read back vs recorded CRC-32

The cheap checks cost a ``stat`` per shard, the index's sha256 and one metadata read per
array; they catch a deleted or truncated shard (zarr would read its rows as zeros), swapped
array folders (each ``zarr.json`` names its site and layer), an edited dtype or ``n_tokens``,
and an index of another length or order. Same-size damage (shards swapped between units, a
flipped byte) needs the content check: each unit's rows hashed and compared with the CRC-32
recorded when they were written. Every message names the array, the unit and the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oculi.errors import require_extra
from oculi.harvest.folder import INDEX, MANIFEST, UNIT_LOG, ZARR_META, HarvestStoreError


def shard_path(root: Path, name: str, k: int) -> Path:
    """The file of shard ``k`` of array ``name`` (zarr v3's default chunk key encoding).

    ::

        shard_path(Path("acts"), "resid_post/6", 3)    # acts/resid_post/6/c/3/0
    """
    return root / name / "c" / str(k) / "0"


@dataclass(frozen=True)
class ArrayMeta:
    name: str
    site: str
    layer: int
    width: int


@dataclass(frozen=True)
class Layout:
    """What the manifest says the store holds."""

    root: Path
    arrays: tuple[ArrayMeta, ...]
    n_tokens: int
    chunk_rows: int
    unit_rows: int
    dtype: str
    index: dict[str, Any] | None

    @classmethod
    def of(cls, root: Path, manifest: dict[str, Any]) -> Layout:
        try:
            cfg = manifest["config"]
            arrays = tuple(
                ArrayMeta(str(a["name"]), str(a["site"]), int(a["layer"]), int(a["width"]))
                for a in cfg["arrays"]
            )
            return cls(root, arrays, int(manifest["tokens"]["n_tokens"]), int(cfg["chunk_rows"]),
                       int(cfg["unit_rows"]), str(cfg["storage_dtype"]),
                       manifest.get("index"))  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise HarvestStoreError(
                f"the manifest '{root / MANIFEST}' lacks or garbles {exc}; it was edited or "
                "damaged: rebuild the store (resume=False)"
            ) from None

    @property
    def n_units(self) -> int:
        return -(-self.n_tokens // self.unit_rows)

    def rows(self, k: int) -> list[int]:
        return [k * self.unit_rows, min((k + 1) * self.unit_rows, self.n_tokens)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def index_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps of the index: rows, bytes and sha256 of the file."""
    pq = require_extra("pyarrow.parquet", "store")
    return {
        "rows": pq.read_metadata(path).num_rows,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
    }


def index_problem(layout: Layout) -> str | None:
    """Why the index cannot be served, or ``None`` when it is the one written with the store."""
    path, want = layout.root / INDEX, layout.index
    if not path.is_file():
        return f"the index '{path}' is missing"
    if not want:
        return f"the manifest '{layout.root / MANIFEST}' has no record of the index"
    pq = require_extra("pyarrow.parquet", "store")
    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as exc:  # pyarrow's ArrowInvalid: not a Parquet file
        return f"the index '{path}' is not a Parquet file ({exc})"
    if rows != layout.n_tokens:
        return f"the index '{path}' has {rows} rows, the store {layout.n_tokens} tokens"
    if path.stat().st_size != want.get("bytes") or _sha256(path) != want.get("sha256"):
        return (
            f"the index '{path}' is not the one written with the store (its size or sha256 "
            f"differs from the manifest's record): replaced, reordered or edited"
        )
    return None


def check_arrays(layout: Layout) -> dict[str, Any]:
    """Open every array, checking its ``zarr.json`` against the manifest; ``{name: zarr.Array}``."""
    zarr = require_extra("zarr", "store")
    manifest = layout.root / MANIFEST
    out = {}
    for a in layout.arrays:
        meta = layout.root / a.name / ZARR_META
        try:
            z = zarr.open_array(str(layout.root / a.name), mode="r")
        except Exception as exc:
            raise HarvestStoreError(
                f"array {a.name!r}: its metadata '{meta}' is missing or unreadable ({exc})"
            ) from None
        attrs = dict(z.attrs)
        found = {
            "site": attrs.get("site"),
            "layer": attrs.get("layer"),
            "shape": tuple(z.shape),
            "dtype": str(np.dtype(z.dtype)),
            "chunks": tuple(z.chunks),
            "shards": tuple(z.shards or ()),
        }
        want = {
            "site": a.site,
            "layer": a.layer,
            "shape": (layout.n_tokens, a.width),
            "dtype": layout.dtype,
            "chunks": (layout.chunk_rows, a.width),
            "shards": (layout.unit_rows, a.width),
        }
        for key, value in want.items():
            if found[key] != value:
                raise HarvestStoreError(
                    f"array {a.name!r}: '{meta}' says {key} {found[key]!r}, the manifest "
                    f"'{manifest}' {value!r} (array folders swapped, or metadata edited); "
                    "rebuild the store (resume=False)"
                )
        out[a.name] = z
    return out


def unit_problems(layout: Layout, done: dict[int, dict[str, Any]]) -> dict[int, str]:
    """Committed units whose records or shard files disagree with the store (a stat each)."""
    log = layout.root / UNIT_LOG
    problems: dict[int, str] = {}
    for k, rec in sorted(done.items()):
        where = f"{log}:{rec.get('line', '?')}"
        if k >= layout.n_units:
            problems[k] = f"{where} records unit {k}, but the store has {layout.n_units} units"
        elif list(rec["rows"]) != layout.rows(k):
            problems[k] = f"{where}: unit {k} covers rows {rec['rows']}, the store {layout.rows(k)}"
        else:
            problem = _shards_problem(layout, k, rec, where)
            if problem:
                problems[k] = problem
    return problems


def _shards_problem(layout: Layout, k: int, rec: dict[str, Any], where: str) -> str | None:
    for a in layout.arrays:
        path = shard_path(layout.root, a.name, k)
        want = rec["nbytes"].get(a.name)
        if want is None or a.name not in rec["crc32"]:
            return f"array {a.name!r}, unit {k}: the unit log ({where}) has no record of it"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return (
                f"array {a.name!r}, unit {k}: shard file '{path}' is missing (its rows would "
                "read as zeros)"
            )
        if size != want:
            return (
                f"array {a.name!r}, unit {k}: shard file '{path}' is {size} bytes, the unit "
                f"log ({where}) recorded {want}"
            )
    return None


def content_problems(
    layout: Layout, done: dict[int, dict[str, Any]], arrays: dict[str, Any]
) -> dict[int, str]:
    """Committed units whose rows, read back, do not match their recorded CRC-32."""
    import zlib

    problems: dict[int, str] = {}
    for k, rec in sorted(done.items()):
        start, stop = rec["rows"]
        for a in layout.arrays:
            path = shard_path(layout.root, a.name, k)
            want = rec["crc32"].get(a.name)
            try:
                data = np.ascontiguousarray(arrays[a.name][start:stop])
            except Exception as exc:  # zarr's CRC-32C of a chunk, a torn shard
                problems[k] = (
                    f"array {a.name!r}, unit {k}: shard file '{path}' cannot be read ({exc})"
                )
                break
            got = zlib.crc32(data.data)
            if got != want:
                problems[k] = (
                    f"array {a.name!r}, unit {k}: shard file '{path}' holds other rows than were "
                    f"written (CRC-32 {got:08x}, recorded {want if want is None else f'{want:08x}'})"
                )
                break
    return problems
