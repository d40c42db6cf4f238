"""Shuffled reading: a permutation of row numbers, read in chunk-aware windows.

::

    for batch in store.shuffled(seed=0, batch_rows=4096):
        x = batch["resid_post", 6]      # [4096, d_model]; batch.rows are their row numbers

The order is computed from the row numbers alone (nothing is loaded to shuffle): the chunks
are permuted, taken a window at a time (``window_bytes`` of data, a few hundred MB), and the
rows of each window are permuted. Each epoch visits every row exactly once, the same seed and
epoch give the same order, and every read is whole chunks in file order, so the store streams
at disk speed while batches mix rows from many places in the data set (a window holds
``window_bytes / chunk_bytes`` random chunks). A window bigger than the store is a uniform
shuffle. The next window is read on a background thread while the current one is served.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from oculi.errors import InputError

if TYPE_CHECKING:
    from oculi.harvest.store import HarvestStore, Key


@dataclass
class ShuffledBatch:
    """Rows of several arrays: ``batch["resid_post", 6]`` -> ``[n, width]``; ``rows`` ``[n]``."""

    rows: np.ndarray
    arrays: dict[Key, np.ndarray]

    def __getitem__(self, key: Key) -> np.ndarray:
        return self.arrays[key]

    def __len__(self) -> int:
        return len(self.rows)


def shuffle_windows(
    n_rows: int, chunk_rows: int, seed: int, epoch: int, window_chunks: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(chunks, order)`` per window: its chunk ids (sorted) and its rows in served order."""
    rng = np.random.default_rng([seed, epoch])
    n_chunks = -(-n_rows // chunk_rows)
    perm = rng.permutation(n_chunks)
    windows = []
    for i in range(0, n_chunks, window_chunks):
        chunks = np.sort(perm[i : i + window_chunks])
        rows = np.concatenate(
            [np.arange(c * chunk_rows, min((c + 1) * chunk_rows, n_rows)) for c in chunks]
        )
        windows.append((chunks, rows[rng.permutation(len(rows))]))
    return windows


def _runs(chunks: np.ndarray) -> list[tuple[int, int]]:
    """Sorted chunk ids -> ``(first, last + 1)`` runs of consecutive chunks."""
    breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(chunks, breaks)]


def iter_shuffled(
    store: HarvestStore,
    seed: int,
    batch_rows: int,
    *,
    keys: Sequence[Key] | None,
    split: str | None,
    rows: np.ndarray | None,
    epoch: int,
    window_bytes: int,
    drop_last: bool,
    shard: tuple[int, int],
) -> Iterator[ShuffledBatch]:
    """Batches of ``batch_rows`` rows (the last may be short unless ``drop_last``).

    Args:
        keys: the ``(site, layer)`` arrays to read (default all).
        split, rows: restrict to a split of the index and/or to given row numbers.
        shard: ``(i, n)``: serve only windows ``i, i + n, ...`` (DataLoader workers, ranks).
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise InputError(f"batch_rows must be a positive int, got {batch_rows!r}")
    keys = list(keys) if keys is not None else store.keys
    arrays = {k: store[k] for k in keys}
    wanted = None
    if split is not None or rows is not None:
        wanted = np.zeros(store.n_rows, dtype=bool)
        wanted[store.rows_of(split)] = True
        if rows is not None:
            given = np.zeros(store.n_rows, dtype=bool)
            given[np.asarray(rows, dtype=np.int64)] = True
            wanted &= given
    chunk_rows = store.chunk_rows
    row_bytes = sum(a.shape[1] * a.dtype.itemsize for a in arrays.values())
    window_chunks = max(1, int(window_bytes // max(row_bytes * chunk_rows, 1)))
    windows = shuffle_windows(store.n_rows, chunk_rows, seed, epoch, window_chunks)
    windows = windows[shard[0] :: shard[1]]

    def read(window: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, dict[Key, np.ndarray]]:
        chunks, order = window
        if wanted is not None:
            order = order[wanted[order]]
        base = chunks * chunk_rows  # first row of each chunk, sorted
        data = {}
        for key, arr in arrays.items():
            parts = [
                arr.zarr[a * chunk_rows : min(b * chunk_rows, store.n_rows)]
                for a, b in _runs(chunks)
            ]
            block = np.concatenate(parts) if len(parts) > 1 else parts[0]
            data[key] = block
        # row r sits at (offset of its chunk in the window) + (r % chunk_rows)
        local = np.searchsorted(base, order, side="right") - 1
        starts = np.concatenate([[0], np.cumsum(np.minimum(chunk_rows, store.n_rows - base))[:-1]])
        at = starts[local] + (order - base[local])
        return order, {k: v[at] for k, v in data.items()}

    carry_rows: list[np.ndarray] = []
    carry: dict[Key, list[np.ndarray]] = {k: [] for k in keys}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="oculi-shuffle") as pool:
        future = pool.submit(read, windows[0]) if windows else None
        for i in range(len(windows)):
            order, data = future.result()  # type: ignore[union-attr]  # set when windows exist
            if i + 1 < len(windows):
                future = pool.submit(read, windows[i + 1])  # read ahead while serving this one
            carry_rows.append(order)
            for k in keys:
                carry[k].append(data[k])
            have = sum(len(r) for r in carry_rows)
            if have < batch_rows:
                continue
            all_rows = np.concatenate(carry_rows)
            joined = {k: np.concatenate(carry[k]) for k in keys}
            full = (have // batch_rows) * batch_rows
            for s in range(0, full, batch_rows):
                yield ShuffledBatch(
                    all_rows[s : s + batch_rows],
                    {k: v[s : s + batch_rows] for k, v in joined.items()},
                )
            carry_rows = [all_rows[full:]]
            carry = {k: [v[full:]] for k, v in joined.items()}
    tail = np.concatenate(carry_rows) if carry_rows else np.empty(0, dtype=np.int64)
    if len(tail) and not drop_last:
        yield ShuffledBatch(tail, {k: np.concatenate(carry[k]) for k in keys})


class HarvestTorchDataset(torch.utils.data.IterableDataset):
    """Shuffled batches as torch tensors; with ``DataLoader(num_workers=n)`` each worker
    serves a disjoint share of the windows, so an epoch still covers every row once."""

    def __init__(self, store: HarvestStore, keys: Sequence[Key], batch_rows: int, seed: int,
                 options: dict[str, Any]) -> None:  # fmt: skip
        super().__init__()
        self.store, self.keys, self.batch_rows, self.seed = store, list(keys), batch_rows, seed
        self.options = dict(options)
        self.epoch = int(self.options.pop("epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        shard = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        self.epoch += 1
        for batch in self.store.shuffled(self.seed, self.batch_rows, keys=self.keys,
                                         epoch=epoch, shard=shard, **self.options):  # fmt: skip
            tensors = tuple(torch.from_numpy(batch[k]) for k in self.keys)
            yield tensors[0] if len(tensors) == 1 else tensors
