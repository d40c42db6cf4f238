"""The in-process executor: compute units in order, write them on a second thread.

::

    oculi.harvest(adapter, prompts, sites=["resid_post"], layers=[3], out="acts",
                  executor=LocalExecutor(progress=False))

While the writer thread writes unit ``k`` (zarr encodes and writes its shards, then the unit
is committed to the log), the model computes unit ``k + 1``: torch and file I/O release the
GIL, so writing costs little wall time. At most ``queue`` computed units wait for the writer,
which bounds host memory at ``(queue + 2)`` units of buffers.
"""

from __future__ import annotations

import queue
import threading
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from oculi.harvest.compute import compute_unit
from oculi.harvest.writer import open_arrays, write_unit

if TYPE_CHECKING:
    from oculi.harvest.plan import HarvestPlan, Unit
    from oculi.harvest.prompts import Tokens
    from oculi.harvest.writer import StoreWriter
    from oculi.models.adapter import Adapter


class LocalExecutor:
    """Run every pending unit in this process (the model's own device), writes overlapped.

    Args:
        progress: show a tqdm bar (tokens).
        queue: computed units that may wait for the writer (1 = double buffering).

    Example::

        oculi.harvest(adapter, prompts, sites=["resid_post"], layers=[6], out="acts",
                      executor=LocalExecutor(progress=False))
    """

    name = "local"

    def __init__(self, *, progress: bool = True, queue: int = 1) -> None:
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
            raise ValueError(f"queue must be a positive int, got {queue!r}")
        self.progress, self.queue = progress, queue

    def run(
        self,
        adapter: Adapter,
        plan: HarvestPlan,
        tokens: Tokens,
        units: list[Unit],
        writer: StoreWriter,
    ) -> None:
        """Compute and write ``units``, committing each to ``writer`` once its shards are on disk."""
        arrays = open_arrays(writer.root, plan)
        pending: queue.Queue[Any] = queue.Queue(maxsize=self.queue)
        errors: list[BaseException] = []
        bar = tqdm(
            total=sum(u.rows for u in units), unit="tok", unit_scale=True,
            desc="harvest", disable=not self.progress,
        )  # fmt: skip

        def write_loop() -> None:
            while True:
                item = pending.get()
                if item is None:
                    return
                if errors:
                    continue  # drain after a failure so the producer never blocks
                unit, buffers, overflow = item
                try:
                    writer.commit(write_unit(writer.root, plan, unit, buffers, arrays, overflow))
                    bar.update(unit.rows)
                except BaseException as exc:  # re-raised in the calling thread
                    errors.append(exc)

        thread = threading.Thread(target=write_loop, name="oculi-harvest-writer", daemon=True)
        thread.start()
        try:
            for unit in units:
                if errors:
                    break
                overflow: dict[str, float] = {}
                buffers = compute_unit(adapter, plan, tokens, unit, overflow)
                pending.put((unit, buffers, overflow))
        finally:
            pending.put(None)
            thread.join()
            bar.close()
        if errors:
            raise errors[0]
