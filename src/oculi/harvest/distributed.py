"""The Ray executor: units as a Ray Data stream, one model per actor, no single writer.

::

    ray.init(address="auto")                                # or let the executor do it
    oculi.harvest(adapter, prompts, sites=["resid_post"], layers=range(18), out="/shared/acts",
                  executor=RayExecutor(concurrency=8, num_gpus=1))

The driver tokenises, plans and creates the store (arrays, index, manifest), then turns the
pending units into a Ray Dataset, one row per unit holding the token ids of the prompts it
touches. ``map_batches`` runs a callable class over it with a fixed pool of ``concurrency``
actors; each actor loads the model once (``oculi.load(model)`` on its own device, or the
``loader`` given), checks that it is the model the store was planned with, computes its units
and writes their shards itself (``out`` must be a folder every node sees: NFS, Lustre...). It
returns only checksums and sizes; the driver commits units as results stream back, so a crash
of any part loses at most the units in flight.

Scaling model
-------------
For ``N`` actors spread over ``M`` nodes (``n = N / M`` per node), a harvest of ``T`` tokens
in ``u = ceil(T / U)`` units of ``U`` rows takes about::

    wall ≈ s·S_1 + ceil(u / N)·s·(c_U + w_U) + d,        s = n / min(n, P)

* ``S_1``: one actor's start-up (Ray worker start, imports, one model load), paid by all
  actors at once.
* ``c_U``: compute of one unit on one actor with its own device, ``U / r`` with ``r`` the
  local executor's tokens/s on that device (about the bare forward's rate).
* ``w_U``: the part of writing a unit's shards (``U · row_bytes``) not hidden behind compute.
  The actors of a node share its disk or network link (``B_node`` bytes/s), so writing caps
  throughput once ``n · r · row_bytes > B_node``.
* ``d``: driver work: tokenising, writing the index (seconds per 10^6 tokens), a log line per
  unit.
* ``P``: how many of a node's actors have a device of their own (GPUs, or free CPU cores).
  ``s`` is the slow-down when actors share devices: with one GPU per actor ``s = 1`` and
  throughput is linear, ``N · r`` tokens/s, until ``M · B_node / row_bytes`` caps it; ``n``
  CPU actors on ``P < n`` free cores each run ``n / P`` times slower, loads included, so
  adding them gains nothing.

Units should far outnumber actors (``u >> N``) so the last wave, ``ceil(u / N)``, leaves no
actor idle for long. ``bench/bench_harvest.py --ray`` fits ``S_1`` and ``c_U + w_U`` on a
1-actor run and checks the prediction on a 2-actor run (numbers in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from oculi.errors import InputError, require_extra
from oculi.harvest.compute import compute_unit, unit_segments
from oculi.harvest.plan import HarvestPlan, Unit
from oculi.harvest.prompts import Tokens
from oculi.harvest.writer import HarvestStoreError, UnitResult, open_arrays, write_unit

if TYPE_CHECKING:
    from oculi.harvest.writer import StoreWriter
    from oculi.models.adapter import Adapter


class RayExecutor:
    """Run units on a pool of Ray actors (``pip install 'oculi[scale]'``).

    Args:
        model: what each actor loads with ``oculi.load`` (a folder every node can read, a
            hub id, ``"gemma-3-270m"``); default the driver model's ``name_or_path``.
        loader: instead of ``model``, a function returning an :class:`~oculi.Adapter`, called
            once in each actor (must be picklable: a module-level function).
        address: the Ray cluster to join (``"auto"``, ``"ray://host:10001"``); ``None``
            joins a running one or starts a local one. Ignored if Ray is already initialised.
        concurrency: actors (model copies) in the pool.
        num_gpus, num_cpus: resources per actor (``num_gpus=1``: one GPU each).
        device, dtype: passed to ``oculi.load`` (default: cuda when ``num_gpus > 0``, else
            cpu; the driver model's dtype).
        init_kwargs: more arguments for ``ray.init`` (``num_cpus=``, ``runtime_env=``...).

    Example::

        executor = RayExecutor(model="gemma-3-270m", concurrency=4, num_gpus=1)
        oculi.harvest(adapter, prompts, sites=["resid_post"], layers=range(18), out="acts",
                      executor=executor)
    """

    name = "ray"

    def __init__(
        self,
        *,
        model: str | os.PathLike | None = None,
        loader: Callable[[], Adapter] | None = None,
        address: str | None = None,
        concurrency: int = 1,
        num_gpus: float = 0,
        num_cpus: float = 1,
        device: str | None = None,
        dtype: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise InputError(f"concurrency must be a positive int, got {concurrency!r}")
        if num_gpus < 0 or num_cpus < 0:
            raise InputError(f"num_gpus and num_cpus must be >= 0, got {num_gpus}, {num_cpus}")
        if model is not None and loader is not None:
            raise InputError("pass model= or loader=, not both")
        self.model = str(model) if model is not None else None
        self.loader, self.address = loader, address
        self.concurrency, self.num_gpus, self.num_cpus = concurrency, num_gpus, num_cpus
        self.device, self.dtype = device, dtype
        self.init_kwargs = dict(init_kwargs or {})

    def _source(self, adapter: Adapter) -> str | None:
        if self.loader is not None:
            return None
        source = self.model or getattr(adapter.model, "name_or_path", None)
        if not source:
            raise InputError(
                "RayExecutor needs a model each actor can load: pass model='path/or/hub-id' "
                "(the driver's model has no name_or_path) or loader=a function"
            )
        return source

    def run(
        self,
        adapter: Adapter,
        plan: HarvestPlan,
        tokens: Tokens,
        units: list[Unit],
        writer: StoreWriter,
    ) -> None:
        """Compute and write ``units`` on the actor pool; commit each as its result arrives."""
        ray = require_extra("ray", "scale")
        from oculi.harvest.run import model_identity

        source = self._source(adapter)
        if not ray.is_initialized():
            ray.init(address=self.address, **{"log_to_driver": False, **self.init_kwargs})
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        items = [unit_item(tokens, u) for u in units]
        dataset = ray.data.from_items(items, override_num_blocks=len(items))
        results = dataset.map_batches(
            HarvestActor,
            fn_constructor_kwargs={
                "source": source,
                "loader": self.loader,
                "device": self.device or ("cuda" if self.num_gpus > 0 else "cpu"),
                "dtype": self.dtype or str(adapter.dtype).removeprefix("torch."),
                "threads": max(1, int(self.num_cpus)),
                "plan": plan,
                "root": str(Path(writer.root).resolve()),
                "identity": model_identity(adapter),
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.concurrency),
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
        )
        for row in results.iter_rows():
            writer.commit(
                UnitResult(
                    unit=int(row["unit"]),
                    start=int(row["start"]),
                    stop=int(row["stop"]),
                    crc32=json.loads(row["crc32"]),
                    nbytes=json.loads(row["nbytes"]),
                    seconds=float(row["seconds"]),
                    worker=str(row["worker"]),
                    overflow=json.loads(row["overflow"]),
                )
            )


def unit_item(tokens: Tokens, unit: Unit) -> dict[str, Any]:
    """One Dataset row: the unit and the token ids of the prompts it touches (as bytes)."""
    segments = unit_segments(tokens, unit)
    first, last = segments[0][0], segments[-1][0] + 1
    offsets = tokens.offsets[first : last + 1]
    return {
        "unit": unit.index,
        "start": unit.start,
        "stop": unit.stop,
        "base": int(offsets[0]),  # row of the first prompt's first token
        "ids": tokens.ids[offsets[0] : offsets[-1]].tobytes(),
        "offsets": (offsets - offsets[0]).tobytes(),
    }


def local_tokens(item: dict[str, Any]) -> tuple[Tokens, Unit, Unit]:
    """A unit's row -> its prompts as :class:`Tokens`, the unit in their rows, and in the store's."""
    tokens = Tokens(
        ids=np.frombuffer(item["ids"], dtype=np.int32),
        offsets=np.frombuffer(item["offsets"], dtype=np.int64),
    )
    k, start, stop, base = (int(item[key]) for key in ("unit", "start", "stop", "base"))
    return tokens, Unit(k, start - base, stop - base), Unit(k, start, stop)


class HarvestActor:
    """The callable class ``map_batches`` runs: one model per actor, one unit per call."""

    def __init__(self, source, loader, device, dtype, threads, plan, root, identity) -> None:
        import torch

        import oculi
        from oculi.harvest.run import model_identity

        torch.set_num_threads(threads)
        self.adapter = (
            loader() if loader is not None else oculi.load(source, device=device, dtype=dtype)
        )
        found = model_identity(self.adapter)
        if found != identity:
            raise HarvestStoreError(
                f"the model loaded in a Ray actor ({source or loader}) is not the driver's: "
                f"{found} vs {identity}; pass RayExecutor(model=...) pointing at the same weights"
            )
        self.plan, self.root = plan, Path(root)
        self.arrays = open_arrays(self.root, plan)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import socket
        import time

        out: dict[str, list[Any]] = {
            k: []
            for k in ("unit", "start", "stop", "crc32", "nbytes", "seconds", "worker", "overflow")
        }
        for i in range(len(batch["unit"])):
            t0 = time.perf_counter()
            tokens, local_unit, unit = local_tokens({k: batch[k][i] for k in batch})
            overflow: dict[str, float] = {}
            buffers = compute_unit(self.adapter, self.plan, tokens, local_unit, overflow)
            result = write_unit(self.root, self.plan, unit, buffers, self.arrays, overflow)
            out["unit"].append(result.unit)
            out["start"].append(result.start)
            out["stop"].append(result.stop)
            out["crc32"].append(json.dumps(result.crc32))
            out["nbytes"].append(json.dumps(result.nbytes))
            out["seconds"].append(time.perf_counter() - t0)
            out["worker"].append(f"{socket.gethostname()}:{os.getpid()}")
            out["overflow"].append(json.dumps(result.overflow))
        return {k: np.asarray(v) for k, v in out.items()}
