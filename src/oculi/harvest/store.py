"""Reading a harvest store: lazy arrays, the Parquet index, shuffled batches, a torch dataset.

::

    store = oculi.open_harvest("acts")
    store.index                                  # pyarrow Table: prompt_id, position, token_id, split
    x = store["resid_post", 6]                   # lazy [n_tokens, d_model]
    x[:1024], x[[5, 3, 9]], np.asarray(x)        # reads only what is asked
    for batch in store.shuffled(seed=0, batch_rows=4096, split="train"):
        batch["resid_post", 6]                   # [4096, d_model], rows batch.rows
    loader = DataLoader(store.torch_dataset("resid_post", 6, batch_rows=4096), batch_size=None)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oculi.errors import require_extra
from oculi.harvest.writer import (
    INDEX,
    MANIFEST,
    HarvestStoreError,
    read_unit_log,
    unit_checksums_match,
)

Key = tuple[str, int]


class HarvestArray:
    """One ``(site, layer)`` of a store, ``[n_tokens, width]``, read lazily from zarr.

    Indexing with ints, slices or integer arrays of rows reads only the chunks involved;
    ``np.asarray(array)`` reads it all. ``.zarr`` is the underlying ``zarr.Array``.
    """

    def __init__(self, zarray: Any, site: str, layer: int, heads: int | None) -> None:
        self.zarr, self.site, self.layer, self.heads = zarray, site, layer, heads

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.zarr.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.zarr.dtype)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def chunk_rows(self) -> int:
        return int(self.zarr.chunks[0])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if isinstance(rows, (list, np.ndarray)):
            out = self.take(np.asarray(rows))
            return out[(slice(None), *rest)] if rest else out
        return np.asarray(self.zarr[key])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows in the given order (any order, repeats allowed), reading each chunk once."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self.shape[0]
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"row index out of range for {n} rows (valid -{n}..{n - 1})")
        rows = rows % n if rows.size else rows
        unique, inverse = np.unique(rows, return_inverse=True)
        data = self.zarr.get_orthogonal_selection((unique, slice(None)))
        return np.asarray(data)[inverse]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        data = np.asarray(self.zarr[:])
        return data.astype(dtype, copy=False) if dtype is not None else data

    def __repr__(self) -> str:
        return f"HarvestArray({self.site!r}, layer={self.layer}, shape={self.shape}, dtype={self.dtype})"


class HarvestStore:
    """A harvest store opened for reading (see :func:`open_harvest`).

    Attributes:
        path: the store folder.
        manifest: config, model identity, provenance (``manifest.json``).
        keys: the ``(site, layer)`` pairs stored.
        n_rows: tokens in the store (rows of every array and of the index).
        complete: every work unit committed.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], done: dict[int, Any]) -> None:
        zarr = require_extra("zarr", "store")
        self.path, self.manifest, self._done = path, manifest, done
        cfg = manifest["config"]
        self._arrays: dict[Key, HarvestArray] = {}
        for spec in cfg["arrays"]:
            key = (spec["site"], int(spec["layer"]))
            z = zarr.open_array(str(path / spec["name"]), mode="r")
            self._arrays[key] = HarvestArray(z, key[0], key[1], spec.get("heads"))
        self.n_rows = int(manifest["tokens"]["n_tokens"])
        self.unit_rows = int(cfg["unit_rows"])
        self.chunk_rows = int(cfg["chunk_rows"])
        n_units = -(-self.n_rows // self.unit_rows)
        self.missing_units = sorted(set(range(n_units)) - set(done))
        self._index: Any = None

    @property
    def keys(self) -> list[Key]:
        return list(self._arrays)

    @property
    def sites(self) -> list[str]:
        return list(dict.fromkeys(site for site, _ in self._arrays))

    @property
    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self._arrays})

    @property
    def complete(self) -> bool:
        return not self.missing_units

    @property
    def nbytes(self) -> int:
        """Bytes of array data (uncompressed)."""
        return sum(a.nbytes for a in self._arrays.values())

    def __getitem__(self, key: Key) -> HarvestArray:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(
                f"index a store by (site, layer), e.g. store['resid_post', 3]; got {key!r}"
            )
        site, layer = key
        try:
            return self._arrays[(site, int(layer))]
        except KeyError:
            raise KeyError(
                f"{key!r} is not in this store; it holds sites {self.sites} at layers {self.layers}"
            ) from None

    def __contains__(self, key: object) -> bool:
        return key in self._arrays

    def __iter__(self) -> Iterator[Key]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    @property
    def index(self) -> Any:
        """The Parquet index as a pyarrow Table (memory-mapped; row i = row i of arrays)."""
        if self._index is None:
            pq = require_extra("pyarrow.parquet", "store")
            self._index = pq.read_table(self.path / INDEX, memory_map=True)
        return self._index

    def rows_of(
        self, split: str | None = None, prompt_ids: Sequence[int] | None = None
    ) -> np.ndarray:
        """Row numbers of a split (``"train"``/``"test"``) and/or of some prompts."""
        mask = np.ones(self.n_rows, dtype=bool)
        if split is not None:
            col = self.index.column("split").combine_chunks()
            names = col.dictionary.to_pylist()
            if split not in names:
                raise KeyError(f"split {split!r} is not in this store; it has {names}")
            mask &= col.indices.to_numpy() == names.index(split)
        if prompt_ids is not None:
            pid = self.index.column("prompt_id").to_numpy()
            mask &= np.isin(pid, np.asarray(prompt_ids))
        return np.flatnonzero(mask)

    def shuffled(
        self,
        seed: int = 0,
        batch_rows: int = 4096,
        *,
        keys: Sequence[Key] | None = None,
        split: str | None = None,
        rows: np.ndarray | None = None,
        epoch: int = 0,
        window_bytes: int = 256 << 20,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ):
        """Batches of rows in a reproducible shuffled order; see :mod:`oculi.harvest.shuffle`."""
        from oculi.harvest.shuffle import iter_shuffled

        return iter_shuffled(
            self, seed, batch_rows, keys=keys, split=split, rows=rows, epoch=epoch,
            window_bytes=window_bytes, drop_last=drop_last, shard=shard,
        )  # fmt: skip

    def torch_dataset(self, *keys: Any, batch_rows: int = 4096, seed: int = 0, **options: Any):
        """An ``IterableDataset`` of shuffled batches for a ``DataLoader(batch_size=None)``.

        ``store.torch_dataset("resid_post", 6)`` yields tensors ``[batch_rows, width]``;
        several keys (``("resid_post", 6), ("mlp_out", 6)``) yield tuples. Options are those
        of :meth:`shuffled`; the epoch advances on every pass (or ``dataset.set_epoch``).
        """
        from oculi.harvest.shuffle import HarvestTorchDataset

        if len(keys) == 2 and isinstance(keys[0], str):
            keys = (tuple(keys),)
        for key in keys:
            self[key]  # noqa: B018 - validates the key
        return HarvestTorchDataset(self, keys, batch_rows, seed, options)

    def verify(self) -> list[int]:
        """Read every committed unit back and compare checksums; returns the damaged units."""
        arrays = {f"{s}/{layer}": a.zarr for (s, layer), a in self._arrays.items()}
        return [k for k, rec in sorted(self._done.items()) if not unit_checksums_match(arrays, rec)]

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing_units)} units missing"
        return (
            f"HarvestStore({str(self.path)!r}, rows={self.n_rows}, sites={self.sites}, "
            f"layers={self.layers}, {state})"
        )


def open_harvest(path: str | Path, *, allow_incomplete: bool = False) -> HarvestStore:
    """Open a harvest store for reading (nothing is loaded until asked for).

    Example::

        store = oculi.open_harvest("acts")
        store["resid_post", 6].shape            # (n_tokens, d_model)

    Args:
        path: the folder ``oculi.harvest`` wrote.
        allow_incomplete: open a store whose harvest has not finished (rows of missing units
            read as zeros); by default that is an error.

    Raises:
        HarvestStoreError: not a harvest store, or an incomplete one.
    """
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise HarvestStoreError(f"{str(root)!r} is not an oculi harvest store (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    store = HarvestStore(root, manifest, read_unit_log(root))
    if not store.complete and not allow_incomplete:
        raise HarvestStoreError(
            f"{str(root)!r} is incomplete: {len(store.missing_units)} of "
            f"{-(-store.n_rows // store.unit_rows)} work units are missing; re-run the same "
            "oculi.harvest call to finish it, or pass allow_incomplete=True"
        )
    return store
