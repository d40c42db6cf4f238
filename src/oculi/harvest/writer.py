"""Writing a harvest store: create or resume it, write a unit's shards, commit units.

::

    writer = StoreWriter.create_or_resume(out, plan, tokens, splits, model_info, resume=True)
    writer.pending()                      # units not yet committed (or found damaged)
    result = write_unit(out, plan, unit, buffers)   # any process: one shard per array
    writer.commit(result)                 # the driver only: append to the unit log

On disk::

    out/
      zarr.json                 the root group (attributes: ``oculi_harvest`` format)
      <site>/<layer>/           one zarr v3 array [n_tokens, width] per (site, layer)
      index.parquet             prompt_id, position, token_id, split; row i = row i of arrays
      manifest.json             config, model identity, provenance, tokens' fingerprint
      units.jsonl               the completed units, one JSON line each (append-only)

A unit's record holds, per array, the CRC-32 of the rows it wrote and the size of its shard
file. Resuming checks the size of every committed unit's shard files (a ``stat`` each), so a
shard cut short by a crash or a full disk is found and its unit redone; ``verify=True`` also
reads the rows back and compares checksums. Chunks carry zarr's own CRC-32C, so a flipped
bit fails loudly when read. The log is append-only: a kill mid-line leaves a torn last line,
which is ignored; a unit written twice counts once (the last record wins).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from oculi.errors import InputError, require_extra
from oculi.harvest.plan import HarvestPlan, Unit

FORMAT = 1
MANIFEST, UNIT_LOG, INDEX = "manifest.json", "units.jsonl", "index.parquet"


class HarvestStoreError(InputError):
    """A store that does not match the harvest asked for, or is incomplete or damaged."""


@dataclass(frozen=True)
class UnitResult:
    """What a worker reports after writing a unit: checksums and shard sizes per array."""

    unit: int
    start: int
    stop: int
    crc32: dict[str, int]
    nbytes: dict[str, int]
    seconds: float
    worker: str

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "rows": [self.start, self.stop],
            "crc32": self.crc32,
            "nbytes": self.nbytes,
            "seconds": round(self.seconds, 4),
            "worker": self.worker,
        }


def shard_path(root: Path, name: str, k: int) -> Path:
    """The file of shard ``k`` of array ``name`` (zarr v3's default chunk key encoding)."""
    return root / name / "c" / str(k) / "0"


def open_arrays(root: Path, plan: HarvestPlan) -> dict[str, Any]:
    zarr = require_extra("zarr", "store")
    return {a.name: zarr.open_array(str(root / a.name), mode="r+") for a in plan.arrays}


def write_unit(
    root: str | Path, plan: HarvestPlan, unit: Unit, buffers: dict[str, np.ndarray], arrays=None
) -> UnitResult:
    """Write ``buffers`` (``{name: [unit.rows, width]}``) as shard ``unit.index`` of each array.

    Safe to call from any process: a unit owns its shards, no other unit touches them.
    """
    t0 = time.perf_counter()
    root = Path(root)
    arrays = arrays or open_arrays(root, plan)
    crc, nbytes = {}, {}
    for spec in plan.arrays:
        data = np.ascontiguousarray(buffers[spec.name])
        # a leftover shard of a failed attempt may be torn: zarr would read it back to merge
        shard_path(root, spec.name, unit.index).unlink(missing_ok=True)
        arrays[spec.name][unit.start : unit.stop] = data
        crc[spec.name] = zlib.crc32(data.data)
        nbytes[spec.name] = shard_path(root, spec.name, unit.index).stat().st_size
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return UnitResult(
        unit.index, unit.start, unit.stop, crc, nbytes, time.perf_counter() - t0, worker
    )


def read_unit_log(root: Path) -> dict[int, dict[str, Any]]:
    """Committed units by index (the last record of a unit wins; a torn last line is skipped)."""
    path = root / UNIT_LOG
    done: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that unit was never committed
            done[int(rec["unit"])] = rec
    return done


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def unit_intact(root: Path, rec: dict[str, Any], plan: HarvestPlan) -> bool:
    """Whether every shard of a committed unit has the size recorded at commit."""
    for spec in plan.arrays:
        path = shard_path(root, spec.name, int(rec["unit"]))
        want = rec["nbytes"].get(spec.name)
        if want is None or not path.exists() or path.stat().st_size != want:
            return False
    return True


def unit_checksums_match(arrays: dict[str, Any], rec: dict[str, Any]) -> bool:
    """Read a committed unit's rows back and compare their CRC-32 with the record."""
    start, stop = rec["rows"]
    for name, want in rec["crc32"].items():
        try:
            data = np.ascontiguousarray(arrays[name][start:stop])
        except Exception:  # a damaged chunk (zarr's CRC-32C, a torn shard): redo the unit
            return False
        if zlib.crc32(data.data) != want:
            return False
    return True


class StoreWriter:
    """The driver's side of a store: creation, resume checks, and the unit log."""

    def __init__(self, root: Path, plan: HarvestPlan, done: dict[int, dict[str, Any]]):
        self.root, self.plan, self.done = root, plan, done

    @classmethod
    def create_or_resume(
        cls,
        out: str | os.PathLike,
        plan: HarvestPlan,
        manifest: dict[str, Any],
        write_index,
        *,
        resume: bool,
        verify: bool = False,
    ) -> StoreWriter:
        """Open ``out`` for ``plan``: resume a matching store, or create a fresh one.

        Args:
            out: the store folder.
            plan: the harvest plan.
            manifest: config, model identity, provenance and the tokens' fingerprint.
            write_index: ``write_index(path)`` writes the Parquet index (fresh stores only).
            resume: keep committed units of a matching store; ``False`` rebuilds it.
            verify: also read committed units back and compare checksums.

        Raises:
            HarvestStoreError: ``out`` is a harvest of other prompts, model or config (and
                ``resume=True``), or a non-empty folder that is not a harvest store.
        """
        root = Path(out)
        existing = root / MANIFEST
        if existing.exists():
            old = json.loads(existing.read_text(encoding="utf-8"))
            if resume:
                _check_same(old, manifest, root)
                done = read_unit_log(root)
                writer = cls(root, plan, done)
                writer._drop_damaged(verify)
                return writer
            shutil.rmtree(root)
        elif root.exists() and any(root.iterdir()):
            raise HarvestStoreError(
                f"{str(root)!r} exists and is not an oculi harvest store (no {MANIFEST}); "
                "choose an empty or new folder"
            )
        cls._create(root, plan, manifest, write_index)
        return cls(root, plan, {})

    @staticmethod
    def _create(root: Path, plan: HarvestPlan, manifest: dict[str, Any], write_index) -> None:
        zarr = require_extra("zarr", "store")
        from zarr.codecs import Crc32cCodec, ZstdCodec

        root.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(root), mode="w", attributes={"oculi_harvest": FORMAT})
        compressors: list[Any] = [ZstdCodec(level=3)] if plan.config.compression else []
        for spec in plan.arrays:
            group.create_array(
                spec.name,
                shape=(plan.n_tokens, spec.width),
                chunks=(plan.chunk_rows, spec.width),
                shards=(plan.unit_rows, spec.width),
                dtype=plan.config.storage_dtype,
                compressors=[*compressors, Crc32cCodec()],
                fill_value=0,
                dimension_names=("row", "feature"),
                attributes={"site": spec.site, "layer": spec.layer, "heads": spec.heads},
            )
        write_index(root / INDEX)
        (root / UNIT_LOG).touch()
        # the manifest last: a folder without it is not a store (and is rebuilt)
        _atomic_json(root / MANIFEST, manifest)

    def _drop_damaged(self, verify: bool) -> None:
        arrays = open_arrays(self.root, self.plan) if verify else None
        for k, rec in list(self.done.items()):
            ok = unit_intact(self.root, rec, self.plan)
            if ok and arrays is not None:
                ok = unit_checksums_match(arrays, rec)
            if not ok:
                del self.done[k]

    def pending(self) -> list[Unit]:
        """Units to compute: not committed, or committed but found damaged."""
        return [u for u in self.plan.units() if u.index not in self.done]

    def commit(self, result: UnitResult) -> None:
        """Append a written unit to the log (flushed and synced before returning)."""
        line = json.dumps(result.to_json(), sort_keys=True) + "\n"
        with (self.root / UNIT_LOG).open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done[result.unit] = result.to_json()


_IDENTITY_KEYS = ("config", "model", "tokens")


def _check_same(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    if old.get("format") != new.get("format"):
        raise HarvestStoreError(
            f"{str(root)!r} is harvest format {old.get('format')}, this oculi writes "
            f"{new.get('format')}; harvest into a new folder"
        )
    for key in _IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            what = {"config": "another configuration", "model": "another model",
                    "tokens": "other prompts"}[key]  # fmt: skip
            diff = _first_difference(old.get(key), new.get(key))
            raise HarvestStoreError(
                f"{str(root)!r} holds a harvest with {what}{diff}; pass resume=False "
                "to rebuild it, or harvest into a new folder"
            )


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*b, *(k for k in a if k not in b)]:  # the caller's order: options first
            if a.get(k) != b.get(k):
                return f" ({k}: stored {a.get(k)!r}, now {b.get(k)!r})"
    return ""
