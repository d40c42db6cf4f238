"""Writing a harvest store: create or resume it under a lock, write a unit's shards, commit.

::

    with StoreWriter.create_or_resume(out, plan, manifest, write_index, resume=True) as writer:
        writer.pending()                       # units not yet committed (or found damaged)
        result = write_unit(out, plan, unit, buffers)   # any process: one shard per array
        writer.commit(result)                  # the driver only: append to the unit log

On disk::

    out/
      oculi-harvest.json        the marker: written first, holds the store format
      oculi-harvest.lock        the lock of the harvest writing the store (pid, host)
      zarr.json                 the root group (attributes: ``oculi_harvest`` format)
      <site>/<layer>/           one zarr v3 array [n_tokens, width] per (site, layer)
      index.parquet             prompt_id, position, token_id, split; row i = row i of arrays
      manifest.json             config, model identity, provenance, tokens' and index's hashes
      units.jsonl               the completed units, one JSON line each (append-only)

The manifest is written last, atomically: a folder with the marker but no manifest was
killed while being created, and is rebuilt by the next run. A unit's record holds, per array,
the CRC-32 of the rows it wrote and the size of its shard file. Resuming checks every array's
metadata, the index (rewritten if missing or not the one recorded), and the size of every
committed unit's shards (a ``stat`` each), so a shard deleted or cut short is redone;
``verify=True`` also reads the rows back and compares checksums (:mod:`~oculi.harvest.integrity`).
Index, manifest and marker are written whole or not at all (``write_atomically``); the unit
log's torn last line is cut off on resume (:mod:`~oculi.harvest.unitlog`).
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oculi.errors import FileWriteError, require_extra
from oculi.harvest.folder import (
    FORMAT,
    INDEX,
    MANIFEST,
    UNIT_LOG,
    HarvestStoreError,
    check_ours,
    clear_store,
    read_json,
    read_marker,
    write_json,
    write_marker,
)
from oculi.harvest.integrity import (
    Layout,
    check_arrays,
    content_problems,
    index_problem,
    index_record,
    shard_path,
    unit_problems,
)
from oculi.harvest.lock import StoreLock
from oculi.harvest.plan import HarvestPlan, Unit
from oculi.harvest.unitlog import append_record, read_unit_log

__all__ = ["FORMAT", "HarvestStoreError", "StoreWriter", "UnitResult", "shard_path", "write_unit"]


@dataclass(frozen=True)
class UnitResult:
    """What a worker reports after writing a unit: checksums and shard sizes per array.

    ``overflow``: arrays whose values exceeded the storage dtype's range (stored as inf),
    with the largest finite ``|value|`` before the cast.

    ::

        result = write_unit(root, plan, unit, buffers, arrays)
        result.crc32["resid_post/6"], result.nbytes["resid_post/6"]
    """

    unit: int
    start: int
    stop: int
    crc32: dict[str, int]
    nbytes: dict[str, int]
    seconds: float
    worker: str
    overflow: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "unit": self.unit,
            "rows": [self.start, self.stop],
            "crc32": self.crc32,
            "nbytes": self.nbytes,
            "seconds": round(self.seconds, 4),
            "worker": self.worker,
        }
        return out | ({"overflow": self.overflow} if self.overflow else {})


def open_arrays(root: Path, plan: HarvestPlan) -> dict[str, Any]:
    zarr = require_extra("zarr", "store")
    return {a.name: zarr.open_array(str(root / a.name), mode="r+") for a in plan.arrays}


def write_unit(
    root: str | Path,
    plan: HarvestPlan,
    unit: Unit,
    buffers: dict[str, np.ndarray],
    arrays=None,
    overflow: dict[str, float] | None = None,
) -> UnitResult:
    """Write ``buffers`` (``{name: [unit.rows, width]}``) as shard ``unit.index`` of each array.

    Safe to call from any process: a unit owns its shards, no other unit touches them.

    Raises:
        FileWriteError: a shard could not be written (full disk, file-size limit...); the
            message names the array, the unit and the shard file.

    Example::

        write_unit(root, plan, unit, {"resid_post/6": rows}, arrays)   # rows [unit.rows, d_model]
    """
    t0 = time.perf_counter()
    root = Path(root)
    arrays = arrays or open_arrays(root, plan)
    crc, nbytes = {}, {}
    for spec in plan.arrays:
        data = np.ascontiguousarray(buffers[spec.name])
        path = shard_path(root, spec.name, unit.index)
        try:
            # a leftover shard of a failed attempt may be torn: zarr would read it back to merge
            path.unlink(missing_ok=True)
            arrays[spec.name][unit.start : unit.stop] = data
            nbytes[spec.name] = path.stat().st_size
        except OSError as exc:
            raise FileWriteError(
                f"cannot write array {spec.name!r}, unit {unit.index} to '{path}': "
                f"{exc.strerror or exc}"
            ) from None
        crc[spec.name] = zlib.crc32(data.data)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return UnitResult(unit.index, unit.start, unit.stop, crc, nbytes,
                      time.perf_counter() - t0, worker, dict(overflow or {}))  # fmt: skip


class StoreWriter:
    """The driver's side of a store: the lock, creation, resume checks, and the unit log.

    A context manager: leaving it releases the store's lock.

    ::

        with StoreWriter(root, plan, done, lock) as writer:
            for unit in writer.pending():
                writer.commit(write_unit(root, plan, unit, buffers, arrays))
    """

    def __init__(
        self, root: Path, plan: HarvestPlan, done: dict[int, dict[str, Any]], lock: StoreLock
    ):
        self.root, self.plan, self.done, self.lock = root, plan, done, lock

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
        """Lock ``out`` and open it for ``plan``: resume a matching store, or create one.

        Args:
            out: the store folder (created if missing).
            plan: the harvest plan.
            manifest: config, model identity, provenance and the tokens' fingerprint.
            write_index: ``write_index(path)`` writes the Parquet index.
            resume: keep committed units of a matching store; ``False`` replaces it (only if
                it is an oculi store holding nothing oculi did not write).
            verify: also read committed units back and compare checksums.

        Raises:
            HarvestStoreError: ``out`` is not an oculi store and not empty; another harvest
                holds its lock (:class:`~oculi.harvest.lock.HarvestLockedError`); a store of
                other prompts, model, config or format (and ``resume=True``); array metadata
                that disagrees with the manifest.
        """
        root = Path(out).expanduser()
        check_ours(root)  # before writing anything into a folder that may be someone else's
        root.mkdir(parents=True, exist_ok=True)
        lock = StoreLock(root).acquire()
        try:
            check_ours(root)  # another process may have filled it meanwhile
            marker = read_marker(root)
            if resume and marker is not None and (root / MANIFEST).exists():
                done = _resume(root, plan, manifest, write_index, verify, marker)
                return cls(root, plan, done, lock)
            if marker is not None:
                clear_store(root)  # resume=False, or killed before its manifest was written
            cls._create(root, plan, manifest, write_index)
            return cls(root, plan, {}, lock)
        except BaseException:
            lock.release()
            raise

    @staticmethod
    def _create(root: Path, plan: HarvestPlan, manifest: dict[str, Any], write_index) -> None:
        zarr = require_extra("zarr", "store")
        from zarr.codecs import Crc32cCodec, ZstdCodec

        write_marker(root)  # first: from here on the folder is provably an oculi store
        # mode "a", never "w": zarr's "w" empties the whole folder (marker and lock included)
        group = zarr.open_group(str(root), mode="a", attributes={"oculi_harvest": FORMAT})
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
        # the manifest last: a folder with the marker and without it is rebuilt
        write_json(root / MANIFEST, {**manifest, "index": index_record(root / INDEX)},
                    "the harvest manifest")  # fmt: skip

    def pending(self) -> list[Unit]:
        """Units to compute: not committed, or committed but found damaged."""
        return [u for u in self.plan.units() if u.index not in self.done]

    def commit(self, result: UnitResult) -> None:
        """Append a written unit to the log (flushed and synced before returning)."""
        append_record(self.root / UNIT_LOG, result.to_json())
        self.done[result.unit] = result.to_json()

    def overflow(self) -> dict[str, tuple[float, list[int]]]:
        """Arrays that hold values stored as inf: ``{name: (largest |value|, units)}``."""
        out: dict[str, tuple[float, list[int]]] = {}
        for k, rec in sorted(self.done.items()):
            for name, peak in rec.get("overflow", {}).items():
                old, units = out.get(name, (0.0, []))
                out[name] = (max(old, float(peak)), [*units, k])
        return out

    def close(self) -> None:
        """Release the store's lock."""
        self.lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resume(root: Path, plan: HarvestPlan, new: dict[str, Any], write_index, verify: bool,
            marker: dict[str, Any]) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Check a store for resuming; rewrite its index if needed; its intact committed units."""
    if marker["oculi_harvest"] != FORMAT:
        raise HarvestStoreError(
            f"'{root}' is harvest store format {marker['oculi_harvest']}, this oculi writes "
            f"{FORMAT}; pass resume=False to rebuild it, or harvest into a new folder"
        )
    old = read_json(root / MANIFEST, "the harvest manifest")
    _check_same(old, new, root)
    layout = Layout.of(root, old)
    arrays = check_arrays(layout)
    if index_problem(layout) is not None:  # derived from the tokens: write it again
        write_index(root / INDEX)
        write_json(root / MANIFEST, {**old, "index": index_record(root / INDEX)},
                    "the harvest manifest")  # fmt: skip
    done = read_unit_log(root / UNIT_LOG, repair=True)
    damaged = unit_problems(layout, done)
    intact = {k: rec for k, rec in done.items() if k not in damaged}
    if verify:
        damaged |= content_problems(layout, intact, arrays)
    return {k: rec for k, rec in done.items() if k not in damaged}


# the model first, then the prompts: a configuration derived from the data (chunk sizes) would
# otherwise be named for what is really another model or other prompts
_IDENTITY_KEYS = ("model", "tokens", "config")


def _check_same(old: dict[str, Any], new: dict[str, Any], root: Path) -> None:
    if old.get("format") != new.get("format"):
        raise HarvestStoreError(
            f"'{root}' is harvest format {old.get('format')}, this oculi writes "
            f"{new.get('format')}; pass resume=False to rebuild it, or harvest into a new folder"
        )
    for key in _IDENTITY_KEYS:
        if old.get(key) != new.get(key):
            what = {"config": "another configuration", "model": "another model",
                    "tokens": "other prompts"}[key]  # fmt: skip
            diff = _first_difference(old.get(key), new.get(key))
            raise HarvestStoreError(
                f"'{root}' holds a harvest with {what}{diff}; pass resume=False "
                "to rebuild it, or harvest into a new folder"
            )


def _first_difference(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*b, *(k for k in a if k not in b)]:  # the caller's order: options first
            if a.get(k) != b.get(k):
                return f" ({k}: stored {a.get(k)!r}, now {b.get(k)!r})"
    return ""
