"""Where training rows come from: a harvest store streamed in shuffled order, or an array.

Both give, per epoch, batches of ``(x, y)`` rows (``y`` is ``x`` for an SAE, the written
site for a transcoder) in an order fixed by ``(seed, epoch)``: a store through
:meth:`~oculi.harvest.store.HarvestStore.shuffled` (index shuffling, chunks read whole), an
in-memory ``[N, d]`` tensor or array through a seeded permutation. Batches are
``batch_rows`` long; a short last batch is dropped so every step sees the same batch size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from oculi.errors import InputError

Batch = tuple[Tensor, Tensor]


class Rows:
    """Training rows: ``n_rows``, widths, ``epoch(e)`` batches and a fixed ``sample``."""

    n_rows: int
    d_in: int
    d_out: int
    identity: dict[str, Any]

    def epoch(self, epoch: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, n: int, seed: int) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError


class StoreRows(Rows):
    """Rows of ``store[site, layer]`` (and ``store[target]`` for a transcoder)."""

    def __init__(self, store: Any, key: tuple[str, int], target: tuple[str, int] | None,
                 *, seed: int, batch_rows: int, split: str | None) -> None:  # fmt: skip
        self.store, self.key, self.target = store, key, target
        self.keys = [key] if target is None or target == key else [key, target]
        for k in self.keys:
            store[k]  # noqa: B018 - a KeyError naming the store's sites and layers
        self.seed, self.batch_rows, self.split = seed, batch_rows, split
        self.rows = store.rows_of(split) if split is not None else None
        self.n_rows = len(self.rows) if self.rows is not None else store.n_rows
        self.d_in = store[key].shape[1]
        self.d_out = store[self.keys[-1]].shape[1]
        self.identity = {
            "store": str(store.path),
            "model": store.manifest.get("model"),
            "tokens_sha256": (store.manifest.get("tokens") or {}).get("sha256"),
            "split": split,
        }

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for batch in self.store.shuffled(self.seed, self.batch_rows, keys=self.keys,
                                         split=self.split, epoch=epoch, drop_last=True):  # fmt: skip
            x = torch.from_numpy(np.ascontiguousarray(batch[self.keys[0]]))
            y = torch.from_numpy(np.ascontiguousarray(batch[self.keys[-1]]))
            yield x, y

    def sample(self, n: int, seed: int) -> Batch:
        pool = self.rows if self.rows is not None else np.arange(self.store.n_rows)
        rng = np.random.default_rng([seed, 7])
        rows = np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))
        x = torch.from_numpy(self.store[self.keys[0]].take(rows))
        y = torch.from_numpy(self.store[self.keys[-1]].take(rows))
        return x, y


class ArrayRows(Rows):
    """Rows of an in-memory ``[N, d_in]`` array (and ``[N, d_out]`` targets)."""

    def __init__(self, x: Any, y: Any, *, seed: int, batch_rows: int) -> None:
        self.x = _tensor(x, "data")
        self.y = self.x if y is None else _tensor(y, "targets")
        if self.y.shape[0] != self.x.shape[0]:
            raise InputError(
                f"targets have {self.y.shape[0]} rows, the data {self.x.shape[0]}; they must "
                "be row-aligned"
            )
        self.seed, self.batch_rows = seed, batch_rows
        self.n_rows, self.d_in, self.d_out = self.x.shape[0], self.x.shape[1], self.y.shape[1]
        self.identity = {"store": None, "model": None, "rows": self.n_rows}

    def epoch(self, epoch: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n_rows, generator=g)
        for i in range(0, self.n_rows - self.batch_rows + 1, self.batch_rows):
            idx = order[i : i + self.batch_rows]
            yield self.x[idx], self.y[idx]

    def sample(self, n: int, seed: int) -> Batch:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.n_rows, generator=g)[: min(n, self.n_rows)].sort().values
        return self.x[idx], self.y[idx]


def _tensor(value: Any, name: str) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
    if t.dim() != 2 or not t.is_floating_point():
        raise InputError(
            f"training {name} must be a floating [N, d] array, got shape {list(t.shape)} "
            f"and dtype {t.dtype}"
        )
    return t.detach()
