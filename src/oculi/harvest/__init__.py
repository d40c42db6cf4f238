"""Dataset-scale harvesting: activations of many prompts into a resumable, sharded store.

::

    summary = oculi.harvest(adapter, "prompts.jsonl", sites=["resid_post"], layers=range(18),
                            out="acts")                 # executor="ray" on a cluster
    store = oculi.open_harvest("acts")
    store["resid_post", 6][:1024]                           # numpy [1024, d_model]
    store.index                                             # pyarrow: prompt_id, position, ...
    for batch in store.shuffled(seed=0, batch_rows=4096):   # every row once per epoch
        train_step(batch["resid_post", 6])

**Rows.** Every prompt is tokenised once, up front, so the row of each token is known before
any forward pass: token ``t`` of prompt ``p`` is row ``offsets[p] + t`` of every array, and
row ``i`` of the Parquet index says which prompt, position and token id it is. Padding never
reaches the store: batches are right padded and only real tokens' rows are gathered.

**Units.** The rows are cut into work units of ``unit_rows`` rows, and each array is sharded
with exactly one shard per unit (the chunks inside a shard are 1-16 MB). So the store is one
plain zarr v3 array per ``(site, layer)``, ``[n_tokens, width]``, readable by any zarr
client, and yet units never share a file: any process can write any unit without a lock and
without read-modify-write of a neighbour's shard. A unit's rows may start or end inside a
prompt; that prompt is run whole by both units that touch it (a token's activations depend on
its whole prefix) and each keeps its own rows: at most two extra prompts per unit, ~1% of the
work for 128-token prompts and 16k-row units. Units are a deterministic function of the
tokens and the config, so a re-run computes exactly the units that are not committed.

**Commits.** A worker writes a unit's shards and reports their CRC-32s and file sizes; only
the driver appends the unit to ``units.jsonl``. A unit whose shards were written but not
committed (killed in between) is simply redone; a committed unit whose shard file has the
wrong size (truncated) is found on resume by a ``stat`` and redone; ``verify=True`` (or
``store.verify()``) re-reads and compares checksums. See :mod:`oculi.harvest.writer`.

**Safety.** The store's marker (:mod:`oculi.harvest.folder`) makes it provably oculi's: only
such a folder is ever replaced, and only the files oculi writes in it. One harvest at a time
holds the store's lock (:mod:`oculi.harvest.lock`). ``open_harvest`` serves a store only after
checking it against its records (:mod:`oculi.harvest.integrity`); the unit log survives torn
writes (:mod:`oculi.harvest.unitlog`).

**Executors.** :class:`LocalExecutor` runs units in this process, writing on a second thread
while the next unit computes. :class:`RayExecutor` (``pip install 'oculi[scale]'``) hands
units to Ray Data ``map_batches`` over a pool of actors, each loading the model once and
writing its own shards; the driver commits results as they stream back (scaling model in
:mod:`oculi.harvest.distributed`).
"""

from oculi.harvest.distributed import RayExecutor
from oculi.harvest.local import LocalExecutor
from oculi.harvest.lock import HarvestLockedError
from oculi.harvest.run import HarvestSummary, harvest
from oculi.harvest.store import HarvestArray, HarvestStore, open_harvest
from oculi.harvest.writer import HarvestStoreError

__all__ = [
    "HarvestArray",
    "HarvestLockedError",
    "HarvestStore",
    "HarvestStoreError",
    "HarvestSummary",
    "LocalExecutor",
    "RayExecutor",
    "harvest",
    "open_harvest",
]
