"""Edge scores, the circuits they select, and how faithful those circuits are.

Every scoring method returns a :class:`CircuitScores`: one number per edge estimating how much
the metric changes when that edge alone carries its corrupt value (``metric(edge patched) −
metric(clean)``; exact edge patching gives the true value). Gradient methods:

- :func:`eap` (edge attribution patching, Syed et al. 2023): ``(source(s) − clean(s)) ·
  ∂metric/∂input(r)`` at the clean run, one forward and one backward for every edge.
- :func:`eap_ig` (Hanna et al. 2024): the gradient averaged over ``steps`` points of a path from
  the clean run to the corrupt one: ``variant="inputs"`` moves the embedding (every edge out of
  ``input`` carries weight α), ``variant="activations"`` moves every edge at once and uses each
  point's own sender differences, so the scores add up to ``corrupt − clean`` (completeness,
  reported in ``info``) as ``steps`` grows.

``scores.circuit(top_n=... | threshold=... | recover=0.8)`` keeps edges by ``|score|``, drops
those that no longer connect the input to the logits, and measures **faithfulness** by exact
edge patching: the metric with every edge outside the circuit patched, as a fraction of
``clean − corrupt`` (1: the circuit alone carries the clean behaviour; 0: it carries nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.interrupts import no_grad
from oculi.discovery.forward import head_deltas, through_post_norm
from oculi.discovery.graph import Graph
from oculi.discovery.patch import EdgePatcher, Mode, Outputs
from oculi.errors import InputError
from oculi.patching.metrics import Metric

if TYPE_CHECKING:
    import networkx as nx

    from oculi.models.adapter import Adapter


@dataclass
class Circuit:
    """A set of edges and how much of the behaviour they carry.

    Attributes:
        edges: indices into ``graph.edges``.
        names: the edges' names.
        faithfulness: ``(metric(circuit) − corrupt) / (clean − corrupt)``, by exact patching.
        value: the metric with only the circuit clean.
        n_edges, n_nodes: its size (nodes: components with an edge in the circuit).
    """

    graph: Graph
    edges: list[int]
    names: list[str]
    faithfulness: float
    value: float
    n_edges: int
    n_nodes: int
    scores: list[float] = field(default_factory=list)

    def to_networkx(self) -> nx.DiGraph:
        """The circuit as a networkx graph; edge ``weight`` is the score."""
        return self.graph.to_networkx(self.edges, self.scores or None)

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """The circuit's graph by layer, edge width by score (the ``[viz]`` extra)."""
        from oculi.visualize.circuit import discovered_graph, draw_circuit

        title = title or f"{self.n_edges} edges, faithfulness {self.faithfulness:.2f}"
        return draw_circuit(discovered_graph(self), ax=ax, title=title)


@dataclass
class CircuitScores:
    """One score per edge of ``graph`` from one method.

    Attributes:
        graph: the graph scored.
        values: ``[E]`` estimated change of the metric when each edge alone is patched.
        method: ``"eap"``, ``"eap-ig"``, ``"acdc"``, ...
        clean_value, corrupt_value: the metric with no edge / every edge patched (exact).
        patcher: the exact edge patcher the scores were made with (used for faithfulness).
        info: method-specific numbers (steps, completeness, ...).
        nodes: node scores (``{"a3.h1.q": ..., "m2": ...}``) for node methods (AtP*); their
            edge ``values`` are NaN and circuits are chosen by node.
    """

    graph: Graph
    values: torch.Tensor
    method: str
    clean_value: float
    corrupt_value: float
    patcher: EdgePatcher = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, float] | None = None

    def top(self, n: int = 20) -> list[tuple[str, float]]:
        """The ``n`` edges (nodes, for node methods) with the largest ``|score|``."""
        if self.nodes is not None:
            ranked = sorted(self.nodes.items(), key=lambda kv: -abs(kv[1]))
            return ranked[:n]
        order = self.values.abs().argsort(descending=True)[:n]
        return [(self.graph.edges[i].name, float(self.values[i])) for i in order]

    def ranked(self) -> list[int]:
        """Edge indices by decreasing ``|score|`` (for node methods: the edges of the top-n
        node circuits, see :meth:`_edges_for`)."""
        return self.values.abs().argsort(descending=True).tolist()

    def _units(self) -> list:
        """What ``top_n`` counts: edge indices, or node names for node methods."""
        if self.nodes is not None:
            return [n for n, _ in sorted(self.nodes.items(), key=lambda kv: -abs(kv[1]))]
        return self.ranked()

    def _edges_for(self, units: list) -> list[int]:
        """The edges of a selection: the edges themselves, or for nodes every edge into a kept
        receiver (the logits always) from a kept sender (the input always; a head when its
        query or its key/value head is kept)."""
        if self.nodes is None:
            return list(units)
        kept = set(units)
        group = max(1, self.graph.n_heads // max(1, self.graph.n_kv_heads))
        out = []
        for i, e in enumerate(self.graph.edges):
            r, s = e.receiver, e.sender
            if r.name != "logits" and r.name not in kept:
                continue
            if s.kind == "head":
                kv = (s.head or 0) // group
                base = (
                    f"a{s.layer}.kv{kv}"
                    if self.graph.n_kv_heads != self.graph.n_heads
                    else f"a{s.layer}.h{kv}"
                )
                if not kept & {f"a{s.layer}.h{s.head}.q", f"{base}.k", f"{base}.v"}:
                    continue
            elif s.kind == "mlp" and s.name not in kept:
                continue
            out.append(i)
        return out

    def circuit(
        self,
        *,
        top_n: int | None = None,
        threshold: float | None = None,
        recover: float | None = None,
        prune: bool = True,
    ) -> Circuit:
        """The circuit of the best edges by ``|score|``, with its faithfulness.

        Give one of ``top_n`` (that many edges), ``threshold`` (edges with ``|score| ≥``
        it) or ``recover`` (the smallest top-n circuit, on a doubling grid refined by bisection,
        whose faithfulness reaches that fraction); ACDC's scores also take none of them (the
        circuit ACDC kept). ``prune`` drops edges whose sender the input
        no longer reaches or whose receiver no longer reaches the logits inside the circuit.
        """
        given = [x is not None for x in (top_n, threshold, recover)]
        if not any(given) and "kept" in self.info:
            kept = list(self.info["kept"])
            return self._measure([self._pruned(kept) if prune else kept])[0]
        if sum(given) != 1:
            raise InputError("give exactly one of top_n=, threshold= or recover=")
        if recover is not None:
            return self._recover(float(recover), prune)
        if top_n is not None:
            if top_n < 0:
                raise InputError(f"top_n must be ≥ 0, got {top_n}")
            chosen = self._edges_for(self._units()[:top_n])
        elif self.nodes is not None:
            units = [n for n, v in self.nodes.items() if abs(v) >= float(threshold)]  # type: ignore[arg-type]
            chosen = self._edges_for(units)
        else:
            chosen = (self.values.abs() >= float(threshold)).nonzero()[:, 0].tolist()  # type: ignore[arg-type]
        return self._measure([self._pruned(chosen) if prune else chosen])[0]

    def faithfulness_curve(self, ns: list[int], *, prune: bool = True) -> list[Circuit]:
        """The top-``n`` circuit (edges, or nodes for node methods) for each ``n`` in ``ns``,
        measured in one batched run."""
        units = self._units()
        sets = [self._edges_for(units[:n]) for n in ns]
        return self._measure([self._pruned(s) if prune else s for s in sets])

    def _recover(self, target: float, prune: bool) -> Circuit:
        units = self._units()
        e = len(units)

        def edges(n: int) -> list[int]:
            chosen = self._edges_for(units[:n])
            return self._pruned(chosen) if prune else chosen

        grid = sorted({min(e, 2**k) for k in range(e.bit_length() + 1)} | {e})
        circuits = self._measure([edges(n) for n in grid])
        hit = next((i for i, c in enumerate(circuits) if c.faithfulness >= target), None)
        if hit is None:
            return circuits[-1]
        lo, hi, best = (grid[hit - 1] if hit else 0), grid[hit], circuits[hit]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = self._measure([edges(mid)])[0]
            if c.faithfulness >= target:
                hi, best = mid, c
            else:
                lo = mid
        return best

    def _pruned(self, chosen: list[int]) -> list[int]:
        import networkx as nx

        g = self.graph.to_networkx(chosen)
        from_input = nx.descendants(g, "input") | {"input"} if "input" in g else set()
        to_logits = nx.ancestors(g, "logits") | {"logits"} if "logits" in g else set()
        return [
            i
            for i in chosen
            if self.graph.edges[i].sender.name in from_input
            and self.graph.edges[i].receiver.node in to_logits
        ]

    def _measure(self, sets: list[list[int]]) -> list[Circuit]:
        e = len(self.graph.edges)
        weights = torch.ones(len(sets), e)
        for row, chosen in enumerate(sets):
            weights[row, chosen] = 0.0  # the circuit stays clean, everything else is patched
        values = self.patcher.run(weights)
        span = self.clean_value - self.corrupt_value
        out = []
        for chosen, v in zip(sets, values.tolist()):
            nodes = {self.graph.edges[i].sender.name for i in chosen} | {
                self.graph.edges[i].receiver.node for i in chosen
            }
            faith = (v - self.corrupt_value) / span if span != 0 else float("nan")
            out.append(
                Circuit(
                    self.graph,
                    list(chosen),
                    [self.graph.edges[i].name for i in chosen],
                    faith,
                    v,
                    len(chosen),
                    len(nodes),
                    [] if self.nodes is not None else [float(self.values[i]) for i in chosen],
                )
            )
        return out

    def exact_nodes(
        self, names: list[str] | None = None, *, progress: bool = False
    ) -> dict[str, float]:
        """Exact node patching ``metric(node patched) − clean``: every edge into a q/k/v or MLP
        receiver node, or, for ``m{l}`` senders, every edge out of it; batched."""
        names = list(self.nodes or {}) if names is None else list(names)
        weights = torch.zeros(len(names), len(self.graph.edges))
        for row, name in enumerate(names):
            cols = [
                i
                for i, e in enumerate(self.graph.edges)
                if (e.sender.name == name if name.startswith("m") else e.receiver.name == name)
            ]
            if not cols:
                raise InputError(f"no node {name!r} in the {self.graph.level!r} graph")
            weights[row, cols] = 1.0
        values = self.patcher.run(weights, progress=progress) - self.clean_value
        return dict(zip(names, values.tolist()))

    def exact(self, edges: list[int] | None = None, *, progress: bool = False) -> torch.Tensor:
        """Exact single-edge patching ``metric(edge patched) − clean`` for ``edges`` (default
        all), the reference the scores estimate; batched."""
        idx = list(range(len(self.graph.edges))) if edges is None else list(edges)
        weights = torch.zeros(len(idx), len(self.graph.edges))
        weights[torch.arange(len(idx)), idx] = 1.0
        return self.patcher.run(weights, progress=progress) - self.clean_value


def eap(
    adapter: Adapter,
    graph: Graph,
    clean: Any,
    corrupt: Any,
    *,
    metric: Metric,
    mode: Mode = "corrupt",
) -> CircuitScores:
    """Edge attribution patching: every edge's score from one forward and one backward.

    ``score(s -> r) = Σ_{prompts, positions} (source(s) − clean(s)) · ∂metric/∂input(r)``,
    the first-order estimate of patching that edge alone (exact when the metric is linear in
    the receiver's input). Example::

        scores = eap(adapter, Graph.from_adapter(adapter), clean, corrupt, metric=m)
        scores.top(10); scores.circuit(top_n=50).faithfulness
    """
    patcher = EdgePatcher(adapter, graph, clean, corrupt, metric=metric, mode=mode)
    values = _scores(patcher, None, use_rows=False)
    return CircuitScores(graph, values, "eap", patcher.clean_value, patcher.corrupt_value, patcher)


def eap_ig(
    adapter: Adapter,
    graph: Graph,
    clean: Any,
    corrupt: Any,
    *,
    metric: Metric,
    steps: int = 5,
    variant: Literal["inputs", "activations"] = "inputs",
    mode: Mode = "corrupt",
) -> CircuitScores:
    """EAP with integrated gradients: the gradient averaged along the clean–corrupt path.

    ``steps`` points ``α = (k + ½) / steps`` (the midpoint rule) run as copies of one forward
    and one backward. ``variant="inputs"`` interpolates the embedding; ``"activations"``
    interpolates every edge at once and takes each point's own sender differences, so the
    scores sum to ``corrupt − clean`` up to the quadrature error, which ``info["completeness"]``
    reports (for ``"inputs"``, the sum over edges out of ``input`` does).

    Example::

        scores = eap_ig(adapter, graph, clean, corrupt, metric=metric, steps=5)
        scores.info["completeness"]      # how far the scores' sum is from corrupt − clean
    """
    if variant not in ("inputs", "activations"):
        raise InputError(f"variant must be 'inputs' or 'activations', got {variant!r}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    patcher = EdgePatcher(adapter, graph, clean, corrupt, metric=metric, mode=mode)
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    weights = alphas[:, None].expand(steps, len(graph.edges)).clone()
    if variant == "inputs":
        weights[:, [i for i, e in enumerate(graph.edges) if e.sender.kind != "input"]] = 0.0
    values = _scores(patcher, weights, use_rows=variant == "activations")
    span = patcher.corrupt_value - patcher.clean_value
    counted = (
        values.sum()
        if variant == "activations"
        else values[[i for i, e in enumerate(graph.edges) if e.sender.kind == "input"]].sum()
    )
    info = {
        "steps": steps,
        "variant": variant,
        "completeness": {"sum": float(counted), "target": span, "gap": float(counted) - span},
    }
    return CircuitScores(
        graph, values, "eap-ig", patcher.clean_value, patcher.corrupt_value, patcher, info
    )


def _scores(patcher: EdgePatcher, weights: torch.Tensor | None, *, use_rows: bool) -> torch.Tensor:
    """``[E]`` scores: sender differences times receiver gradients, averaged over the rows.

    ``use_rows``: the differences are ``source − actual`` of each row's own forward (the
    activations path); otherwise ``source − clean``.
    """
    graph = patcher.graph
    _, actual, grads = patcher.gradients(weights)
    s = 1 if weights is None else weights.shape[0]
    if use_rows:
        base = actual
    else:
        base = {k: v.repeat(s, *[1] * (v.ndim - 1)) for k, v in patcher.clean_outputs.items()}
    with no_grad():
        diffs = _sender_diffs(patcher, base, s)
    names = [r.name for r in graph.receivers]
    g = torch.stack([grads[n] for n in names])  # [R, S, P, T, d]
    senders = [x.name for x in graph.senders]
    d = torch.stack([diffs[n] for n in senders])  # [Sd, S, P, T, d]
    matrix = torch.einsum("aspti,bspti->ab", d.double(), g.double()) / s  # [senders, receivers]
    s_idx = {n: i for i, n in enumerate(senders)}
    r_idx = {n: i for i, n in enumerate(names)}
    return torch.tensor(
        [float(matrix[s_idx[e.sender.name], r_idx[e.receiver.name]]) for e in graph.edges]
    )


def _sender_diffs(patcher: EdgePatcher, base: Outputs, s: int) -> dict[str, torch.Tensor]:
    """``source − base`` of every sender as what joins the residual, ``[S, P, T, d]`` each.

    A head's difference is its own (the others' left at ``base``), through the norm after the
    attention branch where there is one.
    """
    graph, adapter, p = patcher.graph, patcher.adapter, patcher.n_prompts

    def diff(key: str) -> torch.Tensor:
        b = base[key].view(s, p, *base[key].shape[1:])
        return patcher.source[key].unsqueeze(0) - b

    out: dict[str, torch.Tensor] = {}
    for sender in graph.senders:
        if sender.kind != "head":
            out[sender.name] = diff(sender.name)
    if graph.level == "components":
        return out
    for layer in range(graph.n_layers):
        dz = diff(f"z{layer}").reshape(s * p, *base[f"z{layer}"].shape[1:])
        hd = head_deltas(adapter, layer, dz)  # [S·P, H, T, d]
        hd = through_post_norm(adapter, layer, base[f"x{layer}"].unsqueeze(1), hd)
        for h in range(graph.n_heads):
            out[f"a{layer}.h{h}"] = hd[:, h].reshape(s, p, *hd.shape[2:])
    return out
