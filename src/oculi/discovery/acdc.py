"""ACDC (Conmy et al. 2023): greedy pruning of edges by exact patching.

Start from the whole graph with every edge clean. Visit the receivers from the logits back to
the first layer; for each, try its incoming edges one after another (latest sender first):
patch the edge (it now carries its corrupt value) and keep it patched, i.e. *removed* from the
circuit, when the damage grows by less than ``threshold``::

    damage(W) = KL(clean ‖ patched) at the read position        (metric = kl_divergence())
              = |metric(W) − metric(clean)|                     (any other metric)

The decisions are sequential, but oculi runs them exactly and batched:

- **chain speculation**: the candidates ``e_1..e_k`` of a receiver run as copies of one
  forward, copy ``j`` with ``e_1..e_j`` all removed. Copy ``j`` is the true next state as long as
  every earlier candidate was accepted; at the first rejection the rest are rerun from the new
  state. A pass over a receiver is ``1 + rejections`` batched forwards.
- **resumed forwards**: every edge removed so far enters the receiver being decided or a later
  one, so each forward resumes at the receiver's layer from the recorded clean run, and runs
  only the positions from the first one where the prompts differ (``EdgePatcher.run`` with
  ``start_layer``).
- **dead receivers**: a node none of whose outgoing edges is still in the circuit cannot change
  the output, so removing an edge into it changes nothing: it is removed without a forward
  (exactly what the sequential algorithm decides when ``threshold > 0``).

``speculate=False`` runs the plain algorithm, one forward per tested edge, as the reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from oculi.discovery.graph import Graph
from oculi.discovery.patch import EdgePatcher, Mode
from oculi.discovery.scores import CircuitScores
from oculi.errors import InputError
from oculi.patching._common import progress_bar
from oculi.patching.metrics import Metric, kl_divergence

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def acdc(
    adapter: Adapter,
    graph: Graph,
    clean: Any,
    corrupt: Any,
    *,
    threshold: float,
    metric: Metric | None = None,
    mode: Mode = "corrupt",
    speculate: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> CircuitScores:
    """The ACDC circuit at ``threshold``; ``scores.circuit()`` returns it.

    Args:
        threshold: an edge is removed when removing it raises the damage by less than this.
        metric: default ``kl_divergence()`` (one prompt pair); a task metric such as
            ``logit_diff`` uses ``|metric − clean|`` as the damage.
        speculate: batched exact decisions (see the module docstring); ``False`` tests one
            edge per forward.
        batch_size: copies per forward when speculating.

    Returns:
        :class:`CircuitScores` whose ``values`` are each edge's damage increase when it was
        tried, ``info["kept"]`` the circuit's edges, ``info["forwards"]`` the number of
        forwards, ``info["rows"]`` the edge sets they ran (copies), ``info["tested"]`` the
        number of edge decisions.
    """
    if not threshold >= 0:
        raise InputError(f"threshold must be a number ≥ 0, got {threshold!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    metric = metric if metric is not None else kl_divergence()
    patcher = EdgePatcher(
        adapter, graph, clean, corrupt, metric=metric, mode=mode, batch_size=batch_size
    )
    run = _Damage(patcher, metric.kind == "kl")
    e = len(graph.edges)
    removed = torch.zeros(e)
    values = torch.full((e,), float("nan"))
    incoming: dict[str, list[int]] = {}
    for i, edge in enumerate(graph.edges):
        incoming.setdefault(edge.receiver.name, []).append(i)
    current = float(run(removed[None])[0])
    bar = progress_bar(e, progress, "ACDC edges")
    try:
        for receiver in reversed(graph.receivers):
            edges = list(reversed(incoming.get(receiver.name, [])))
            if speculate and threshold > 0 and not _alive(graph, removed, receiver.node):
                removed[edges] = 1.0  # nothing downstream reads this node any more
                values[edges] = 0.0
                bar.update(len(edges))
                continue
            if speculate:
                # every edge removed so far enters this receiver or a later one: the layers
                # before it run as in the clean run, so the forwards resume at its layer
                current = _speculate(
                    run, removed, values, edges, current, threshold, batch_size, bar, receiver.layer
                )
            else:
                current = _one_by_one(run, removed, values, edges, current, threshold, bar)
    finally:
        bar.close()
    kept = (removed == 0).nonzero()[:, 0].tolist()
    info = {
        "threshold": threshold,
        "kept": kept,
        "forwards": run.forwards,
        "rows": run.rows,
        "tested": int((~values.isnan()).sum()),
        "damage": current,
    }
    return CircuitScores(
        graph, values, "acdc", patcher.clean_value, patcher.corrupt_value, patcher, info
    )


class _Damage:
    """Damage of edge-weight rows, counting forwards."""

    def __init__(self, patcher: EdgePatcher, kl: bool) -> None:
        self.patcher, self.kl, self.forwards, self.rows = patcher, kl, 0, 0

    def __call__(self, weights: torch.Tensor, start_layer: int | None = None) -> torch.Tensor:
        self.forwards += -(-weights.shape[0] // self.patcher.batch_size)
        self.rows += weights.shape[0]
        values = self.patcher.run(weights, start_layer=start_layer)
        return values if self.kl else (values - self.patcher.clean_value).abs()


def _alive(graph: Graph, removed: torch.Tensor, node: str) -> bool:
    """Whether an edge out of ``node`` (or out of a query head its key/value head feeds) is
    still in the circuit; the logits are always alive."""
    if node == "logits":
        return True
    sources = {node}
    if ".kv" in node:  # a key/value head feeds the query heads of its group
        layer = int(node[1:].split(".")[0])
        group = graph.n_heads // graph.n_kv_heads
        kv = int(node.split(".kv")[1])
        sources = {f"a{layer}.h{h}" for h in range(kv * group, (kv + 1) * group)}
    return any(removed[i] == 0 for i, edge in enumerate(graph.edges) if edge.sender.name in sources)


def _speculate(run, removed, values, edges, current, threshold, batch_size, bar, layer) -> float:
    """Decide ``edges`` in order with chains of copies; the chain length adapts: it doubles
    after a chain of acceptances and shrinks to the last run of acceptances after a rejection,
    so frequent rejections waste few copies."""
    pending = list(edges)
    size = batch_size
    while pending:
        chunk = pending[:size]
        rows = removed.repeat(len(chunk), 1)
        for j in range(len(chunk)):
            rows[j:, chunk[j]] = 1.0  # copy j: chunk[0..j] removed
        damage = run(rows, start_layer=layer)
        taken = len(chunk)
        for j, edge in enumerate(chunk):
            values[edge] = float(damage[j]) - current
            if values[edge] < threshold:
                removed[edge] = 1.0
                current = float(damage[j])
            else:  # kept: later copies assumed it removed, so rerun them
                taken = j + 1
                break
        size = (
            min(batch_size, 2 * size)
            if taken == len(chunk) and values[chunk[-1]] < threshold
            else max(1, taken)
        )
        bar.update(taken)
        pending = pending[taken:]
    return current


def _one_by_one(run, removed, values, edges, current, threshold, bar) -> float:
    for edge in edges:
        trial = removed.clone()
        trial[edge] = 1.0
        damage = float(run(trial[None])[0])
        values[edge] = damage - current
        if values[edge] < threshold:
            removed[edge] = 1.0
            current = damage
        bar.update(1)
    return current
