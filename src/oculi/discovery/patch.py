"""Exact edge patching: the reference every circuit-discovery score is measured against.

::

    graph = Graph.from_adapter(adapter, level="heads")
    patcher = EdgePatcher(adapter, graph, clean, corrupt, metric=logit_diff(" Mary", " John"))
    patcher.clean_value, patcher.corrupt_value        # no edge patched / every edge patched
    patcher.run(mask)                                 # mask [S, E]: the metric per edge set

``patch_edges(adapter, graph, clean, corrupt, edges, metric)`` is the one-call form. The base
run is the clean prompt; a patched edge carries its sender's output from the source: the
corrupt prompt (``mode="corrupt"``), its mean over the corrupt prompts (``"mean"``) or zero
(``"zero"``). Many edge sets run as copies in one batched forward (``batch_size`` sets at a
time). Prompts are one string or a list of strings (or ``[P, T]`` ids) without padding, clean
and corrupt of the same token length; the metric is averaged over the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.inputs import Batch
from oculi.capture.interrupts import enable_grad, no_grad
from oculi.discovery.forward import EdgeForward, Outputs
from oculi.discovery.graph import Edge, Graph
from oculi.errors import InputError
from oculi.patching._common import (
    check_aligned,
    check_read_position,
    progress_bar,
    with_reference,
)
from oculi.patching.metrics import Metric
from oculi.patching.resume import unembed

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

Mode = Literal["corrupt", "mean", "zero"]
EdgeSet = Sequence[str | Edge | int]


class EdgePatcher:
    """Clean and corrupt prompts prepared once; :meth:`run` measures any number of edge sets.

    Attributes:
        clean_value: the metric of the clean run (no edge patched).
        corrupt_value: the metric with every edge patched (the corrupt run for
            ``mode="corrupt"``).
        clean_outputs: every sender's output in the clean run (``[P, T, ...]``).
        source: every sender's output in the patch source.
    """

    def __init__(
        self,
        adapter: Adapter,
        graph: Graph,
        clean: Any,
        corrupt: Any,
        *,
        metric: Metric,
        mode: Mode = "corrupt",
        batch_size: int | None = None,
    ) -> None:
        if mode not in ("corrupt", "mean", "zero"):
            raise InputError(f"mode must be 'corrupt', 'mean' or 'zero', got {mode!r}")
        if batch_size is not None and batch_size < 1:
            raise InputError(f"batch_size must be a positive number of edge sets, got {batch_size}")
        self.adapter, self.graph, self.mode = adapter, graph, mode
        self.clean = _prompts(adapter, clean, "clean")
        self.corrupt_batch = corrupt_batch = _prompts(adapter, corrupt, "corrupt")
        check_aligned(adapter, self.clean, corrupt_batch)
        p, t = self.clean.input_ids.shape
        if corrupt_batch.input_ids.shape[0] != p:
            raise InputError(
                f"{p} clean prompts but {corrupt_batch.input_ids.shape[0]} corrupt ones; give "
                "one corrupt prompt per clean prompt"
            )
        metric = metric.bind(adapter)
        check_read_position(metric, self.clean, "clean")  # unpadded: every row has t tokens
        self.read = metric.position % t
        self.batch_size = batch_size or max(1, 64 // p)
        plain = EdgeForward(adapter, graph, None)
        with no_grad():
            h_clean, clean_out, _ = plain.run(self.clean, None, read=self.read)
            h_corrupt, corrupt_out, _ = plain.run(corrupt_batch, None, read=self.read)
        if metric.kind == "kl":
            if p != 1:
                raise InputError(
                    "the kl metric compares with one clean distribution; give one prompt pair"
                )
            metric = with_reference(metric, unembed(adapter, h_clean, None)[0])
        self.metric = metric
        keys = plain.keys()
        self.clean_outputs: Outputs = clean_out  # also the output projections' outputs x{l}
        self.source = {k: _source(corrupt_out[k], mode) for k in keys}
        self.forward = EdgeForward(adapter, graph, self.source)
        self.clean_value = float(self._metric(h_clean).mean())
        # every edge carrying the corrupt run's value is the corrupt run (tested identity)
        everything = torch.ones(1, len(graph.edges))
        self.corrupt_value = (
            float(self._metric(h_corrupt).mean())
            if mode == "corrupt"
            else float(self.run(everything)[0])
        )

    @property
    def n_prompts(self) -> int:
        return int(self.clean.input_ids.shape[0])

    def _metric(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.metric(unembed(self.adapter, hidden, self.metric.columns())).float()

    def mask(self, edge_sets: Sequence[EdgeSet]) -> torch.Tensor:
        """``[S, E]`` 0/1 weights from edge sets given by name, :class:`Edge` or index."""
        out = torch.zeros(len(edge_sets), len(self.graph.edges))
        for i, edges in enumerate(edge_sets):
            names = [e for e in edges if not isinstance(e, int)]
            idx = [e for e in edges if isinstance(e, int)] + self.graph.index(names)
            out[i, idx] = 1.0
        return out

    def run(
        self, weights: torch.Tensor, *, progress: bool = False, start_layer: int | None = None
    ) -> torch.Tensor:
        """The metric (mean over prompts) for each row of ``weights [S, E]``, ``[S]``.

        ``weights[s, e]`` is 1 where edge ``e`` carries the source value, 0 where it stays
        clean; values in between interpolate.

        ``start_layer``: no row patches an edge into a receiver before this layer, so the
        forward resumes there from the recorded clean run (one prompt), and runs only the
        positions from :attr:`first_change` on: before it every sender's source equals its
        clean output (the prompts share their first tokens, or nothing is patched there), so no
        patch can change those positions and their keys and values come from the recording.
        The same numbers as the full forward (``None``, the reference), checked in the tests.
        """
        weights = self._check(weights)
        resume = self._resume(weights, start_layer)
        out = []
        bar = progress_bar(weights.shape[0], progress, "edge sets")
        try:
            with no_grad():
                for start in range(0, weights.shape[0], self.batch_size):
                    chunk = weights[start : start + self.batch_size]
                    rows = self.rows(chunk)
                    hidden, _, _ = self.forward.run(
                        self.copies(len(chunk)), rows, read=self.read, resume=resume
                    )
                    out.append(self._metric(hidden).view(len(chunk), -1).mean(1).cpu())
                    bar.update(len(chunk))
        finally:
            bar.close()
        return torch.cat(out)

    def _resume(self, weights: torch.Tensor, start: int | None) -> Any:
        if start is None or self.n_prompts != 1:
            return None
        early = [i for i, e in enumerate(self.graph.edges) if e.receiver.layer < start]
        if early and bool(weights[:, early].any()):
            raise InputError(
                f"start_layer={start}, but some edge sets patch edges into receivers before "
                "that layer"
            )
        if getattr(self, "_recorded", None) is None:
            from oculi.patching.resume import ResumableRun

            self._recorded = ResumableRun(self.adapter, self.clean)
            self._first = self._first_change() if self._recorded.can_start_late() else 0
        return (self._recorded, start, self.clean_outputs, self._first)

    @property
    def first_change(self) -> int:
        """The first position where some sender's source differs from its clean output
        (at most the read position): the resumed forwards of :meth:`run` start there."""
        return self._first_change()

    def _first_change(self) -> int:
        first = self.read
        for key, source in self.source.items():
            differs = (source != self.clean_outputs[key]).flatten(2).any(-1).any(0)  # [T]
            where = differs.nonzero()
            if len(where):
                first = min(first, int(where[0, 0]))
        return first

    def gradients(
        self, weights: torch.Tensor | None
    ) -> tuple[torch.Tensor, Outputs, dict[str, torch.Tensor]]:
        """Metric values ``[S]``, sender outputs and ``∂ mean metric / ∂ input(r)`` per receiver.

        One forward and one backward for all ``S`` rows of ``weights`` (``None``: the clean
        run). Gradients are ``[S, P, T, d]`` per receiver name.
        """
        s = 1 if weights is None else self._check(weights).shape[0]
        rows = None if weights is None else self.rows(weights)
        with enable_grad():
            hidden, actual, leaves = self.forward.run(
                self.copies(s), rows, read=self.read, grad_receivers=True
            )
            values = self._metric(hidden).view(s, -1).mean(1)
            names = list(leaves)
            grads = torch.autograd.grad(values.sum(), [leaves[n] for n in names], allow_unused=True)
        out = {}
        for n, g in zip(names, grads):  # None: the metric does not depend on that input
            g = torch.zeros_like(leaves[n]) if g is None else g
            out[n] = g.detach().view(s, self.n_prompts, *g.shape[1:])
        actual = {k: v.detach() for k, v in actual.items()}
        return values.detach().cpu(), actual, out

    def copies(self, s: int) -> Batch:
        """``s`` copies of the clean prompts, set-major."""
        c = self.clean
        rep = [x.repeat(s, 1) for x in (c.input_ids, c.attention_mask, c.position_ids)]
        return Batch(rep[0], rep[1], rep[2], single=False)

    def rows(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-set weights repeated for each prompt, ``[S·P, E]`` on the model's device."""
        return weights.repeat_interleave(self.n_prompts, 0).to(self.adapter.device)

    def _check(self, weights: torch.Tensor) -> torch.Tensor:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.ndim == 1:
            weights = weights[None]
        e = len(self.graph.edges)
        if weights.ndim != 2 or weights.shape[1] != e:
            raise InputError(
                f"edge weights must be [n_sets, {e}] (one column per edge of the graph), got "
                f"{list(weights.shape)}"
            )
        return weights


def patch_edges(
    adapter: Adapter,
    graph: Graph,
    clean: Any,
    corrupt: Any,
    edges: EdgeSet | Sequence[EdgeSet] | torch.Tensor,
    metric: Metric,
    *,
    mode: Mode = "corrupt",
    batch_size: int | None = None,
) -> float | torch.Tensor:
    """The metric with the given edges carrying their source (corrupt, mean or zero) values.

    Args:
        adapter: the model's adapter.
        graph: from :meth:`Graph.from_adapter`.
        clean, corrupt: one prompt each, or equal-length lists of prompts (no padding).
        edges: one edge set (names such as ``"a0.h1->m3"``, :class:`Edge` or indices), a list of
            edge sets, or a ``[S, E]`` weight tensor.
        metric: an :mod:`oculi.patching.metrics` metric, averaged over the prompts.
        mode: where a patched edge's value comes from.

    Returns:
        A float for one edge set, else ``[S]``.

    Example::

        patch_edges(adapter, graph, clean, corrupt, ["a0.h1->logits"], logit_diff(" Mary", " John"))
    """
    patcher = EdgePatcher(
        adapter, graph, clean, corrupt, metric=metric, mode=mode, batch_size=batch_size
    )
    if isinstance(edges, torch.Tensor):
        return patcher.run(edges)
    items: list[Any] = list(edges)
    one = not items or isinstance(items[0], (str, Edge, int))
    values = patcher.run(patcher.mask([items] if one else items))
    return float(values[0]) if one else values


def _prompts(adapter: Adapter, prompts: Any, what: str) -> Batch:
    batch = adapter.prepare(prompts)
    if batch.padded:
        raise InputError(
            f"the {what} prompts have different token lengths (the batch is padded); edge "
            "patching aligns positions, so give prompts of one token length"
        )
    return batch


def _source(values: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "zero":
        return torch.zeros_like(values)
    if mode == "mean":
        return values.mean(0, keepdim=True).expand_as(values).contiguous()
    return values
