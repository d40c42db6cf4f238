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

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from oculi.errors import require_extra
from oculi.harvest.folder import (
    FORMAT,
    INDEX,
    MANIFEST,
    MARKER,
    UNIT_LOG,
    HarvestStoreError,
    read_json,
    read_marker,
)
from oculi.harvest.integrity import (
    Layout,
    check_arrays,
    content_problems,
    index_problem,
    unit_problems,
)
from oculi.harvest.unitlog import read_unit_log

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

    Example::

        store = oculi.open_harvest("acts")
        store["resid_post", 6][:1024]              # numpy [1024, d_model]
        store.index                                # pyarrow table: prompt_id, position, token_id
    """

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        done: dict[int, Any],
        zarrays: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.manifest, self._done = path, manifest, done
        self._layout = Layout.of(path, manifest)
        zarrays = zarrays if zarrays is not None else check_arrays(self._layout)
        self._arrays: dict[Key, HarvestArray] = {}
        for spec in manifest["config"]["arrays"]:
            key = (spec["site"], int(spec["layer"]))
            self._arrays[key] = HarvestArray(
                zarrays[spec["name"]], key[0], key[1], spec.get("heads")
            )
        self.n_rows = self._layout.n_tokens
        self.unit_rows = self._layout.unit_rows
        self.chunk_rows = self._layout.chunk_rows
        self.missing_units = sorted(set(range(self._layout.n_units)) - set(done))
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
        window_bytes: int = 128 << 20,
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
        zarrays = {f"{s}/{layer}": a.zarr for (s, layer), a in self._arrays.items()}
        return sorted(content_problems(self._layout, self._done, zarrays))

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self.missing_units)} units missing"
        return (
            f"HarvestStore({str(self.path)!r}, rows={self.n_rows}, sites={self.sites}, "
            f"layers={self.layers}, {state})"
        )


def open_harvest(
    path: str | Path, *, allow_incomplete: bool = False, verify: bool = False
) -> HarvestStore:
    """Open a harvest store for reading, after checking it against its own records.

    Example::

        store = oculi.open_harvest("acts")
        store["resid_post", 6].shape            # (n_tokens, d_model)

    Always checked (a ``stat`` per shard, the index's sha256, each array's metadata): every
    array's shape, dtype, chunking, site and layer against the manifest; the index's size,
    rows and sha256 against the manifest; every committed unit's shard files against the
    sizes in the unit log. With ``verify=True`` every unit's rows are also read back and
    compared with the CRC-32 recorded when they were written (shards swapped between units,
    flipped bytes).

    Args:
        path: the folder ``oculi.harvest`` wrote.
        allow_incomplete: open a store whose harvest has not finished (rows of missing units
            read as zeros); by default that is an error.
        verify: also compare every unit's content with its recorded checksum (reads it all).

    Raises:
        HarvestStoreError: not a harvest store, an incomplete one, or one whose files
            disagree with its records (the message names the array, the unit and the file).
    """
    root = Path(path).expanduser()
    if not (root / MANIFEST).is_file() or (marker := read_marker(root)) is None:
        missing = MARKER if (root / MANIFEST).is_file() else MANIFEST
        raise HarvestStoreError(f"'{root}' is not an oculi harvest store (no {missing})")
    if marker["oculi_harvest"] != FORMAT:
        raise HarvestStoreError(
            f"'{root}' is harvest store format {marker['oculi_harvest']}; this oculi reads "
            f"format {FORMAT}: harvest it again with this version"
        )
    manifest = read_json(root / MANIFEST, "the harvest manifest")
    layout = Layout.of(root, manifest)
    zarrays = check_arrays(layout)
    problem = index_problem(layout)
    if problem:
        raise HarvestStoreError(f"{problem}; re-run the same oculi.harvest call to rewrite it")
    done = read_unit_log(root / UNIT_LOG)
    problems = unit_problems(layout, done)
    if verify and not problems:
        problems = content_problems(layout, done, zarrays)
    if problems:
        first = problems[min(problems)]
        more = f" ({len(problems) - 1} more units too)" if len(problems) > 1 else ""
        raise HarvestStoreError(
            f"'{root}' is damaged: {first}{more}; re-run the same oculi.harvest call "
            "(verify=True) to redo the damaged units"
        )
    store = HarvestStore(root, manifest, done, zarrays)
    if not store.complete and not allow_incomplete:
        raise HarvestStoreError(
            f"'{root}' is incomplete: {len(store.missing_units)} of "
            f"{layout.n_units} work units are missing; re-run the same "
            "oculi.harvest call to finish it, or pass allow_incomplete=True"
        )
    return store
