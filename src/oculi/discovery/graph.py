"""The computational graph a circuit is searched in: senders, receivers and the edges between.

Every component of a decoder writes into the residual stream and later components read the sum
of what was written before them. Automated circuit discovery treats each write as a *sender*
and each read as a *receiver*, and an **edge** ``s -> r`` as the part of ``r``'s input that is
``s``'s output::

    input(r) = embedding + Σ_{senders s before r} out(s)     (+ constant biases)

Three levels of detail (``Graph.from_adapter(adapter, level=...)``):

``"components"``
    senders: ``input`` (the embedding, as the first layer receives it), ``a{l}`` (the whole
    attention branch of layer ``l``, what it adds to the residual) and ``m{l}`` (the MLP
    branch); receivers: ``a{l}``, ``m{l}`` and ``logits`` (the final norm's input).
``"heads"``
    attention senders are single heads ``a{l}.h{h}`` (the head's ``z`` through the output
    projection); attention receivers are heads too. With as many key/value heads as query heads,
    ``a{l}.h{h}`` receives through its query, key and value projections together; with grouped
    keys and values (GQA) a query head ``a{l}.h{h}`` receives through its query and each
    key/value head ``a{l}.kv{g}`` through its key and value (one input shared by its group).
``"qkv"``
    as ``"heads"``, with each head's query ``a{l}.h{h}.q`` and each key/value head's key
    ``a{l}.kv{g}.k`` and value ``a{l}.kv{g}.v`` as separate receivers.

What an edge means where the anatomy differs:

- **parallel attention** (GPT-NeoX): the MLP of layer ``l`` reads the same input as its
  attention, so there is no edge ``a{l} -> m{l}``.
- **a norm after the attention branch** (Gemma 2/3, OLMo 2): a head's write is not separable
  from its layer's, since the norm rescales the sum of all heads. A head's output is taken
  *before* that norm (its ``z`` through the output projection) and an edge from a set of heads
  of one layer is made exact, not approximated: the receiver sees
  ``norm(o_proj(z) + Σ_{patched heads} Δ_h) − norm(o_proj(z))`` added to its input, i.e. exactly
  the change of the branch's output when those heads' ``z`` alone change.
- **no norm before attention** (OLMo 2): a receiver head's input is the layer input itself.
- **q/k norms over all heads** (OLMo 2): a head's query projection is replaced by one computed
  from its own input, and the norm over all heads then sees it with the others', as the model
  computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from oculi.errors import InputError

if TYPE_CHECKING:
    import networkx as nx

    from oculi.models.adapter import Adapter

Level = Literal["components", "heads", "qkv"]
LEVELS = ("components", "heads", "qkv")


@dataclass(frozen=True)
class Sender:
    """A component's write into the residual stream.

    Attributes:
        name: ``"input"``, ``"a{l}"``, ``"a{l}.h{h}"`` or ``"m{l}"``.
        kind: ``"input"``, ``"attn"``, ``"head"`` or ``"mlp"``.
        layer: the layer (``-1`` for the input).
        head: the head, for ``"head"`` senders.

    Example::

        graph = Graph.from_adapter(adapter, level="heads")
        graph.senders[1]           # Sender(name="a0.h0", kind="head", layer=0, head=0)
    """

    name: str
    kind: str
    layer: int
    head: int | None = None

    @property
    def order(self) -> tuple[int, int]:
        """Where the write happens in the forward: ``(layer, 0)`` attention, ``(layer, 1)`` MLP."""
        return (self.layer, 1 if self.kind == "mlp" else 0)


@dataclass(frozen=True)
class Receiver:
    """A component's read of the residual stream.

    Attributes:
        name: ``"a{l}"``, ``"a{l}.h{h}"``, ``"a{l}.kv{g}"``, ``"a{l}.h{h}.q"``,
            ``"a{l}.kv{g}.k"``, ``"a{l}.kv{g}.v"``, ``"m{l}"`` or ``"logits"``.
        kind: ``"attn"`` (the whole attention input), ``"qkv"`` (the projections ``proj`` of
            ``head``), ``"mlp"`` or ``"logits"``.
        layer: the layer (``n_layers`` for the logits).
        head: the head (query head for ``"q"``, key/value head for ``"k"``/``"v"``).
        proj: which projections read this input: a subset of ``"qkv"``.
        node: the graph node this input belongs to (``"a{l}.h{h}"`` for ``"a{l}.h{h}.q"``).

    Example::

        graph = Graph.from_adapter(adapter, level="qkv")
        [r.name for r in graph.receivers][:3]    # ["a0.h0.q", "a0.h1.q", ...]
    """

    name: str
    kind: str
    layer: int
    head: int | None = None
    proj: str = ""
    node: str = ""

    def order(self, parallel: bool) -> tuple[int, int]:
        """Where the read happens: before attention ``(layer, 0)``, before the MLP ``(layer, 1)``
        (``(layer, 0)`` with parallel attention)."""
        return (self.layer, 1 if self.kind == "mlp" and not parallel else 0)


@dataclass(frozen=True)
class Edge:
    """``sender -> receiver``: the part of the receiver's input that is the sender's output.

    ::

        edge = graph.edges[0]
        edge.sender.name, edge.receiver.name     # ("input", "a0.h0")
    """

    sender: Sender
    receiver: Receiver

    @property
    def name(self) -> str:
        return f"{self.sender.name}->{self.receiver.name}"


@dataclass
class Graph:
    """Senders, receivers and every edge between them for one model.

    Attributes:
        level: ``"components"``, ``"heads"`` or ``"qkv"`` (see the module docstring).
        senders, receivers, edges: in forward order; ``edges[i]`` is edge ``i`` of every
            score and mask.
        parallel: whether attention and MLP read the same layer input.
        n_layers, n_heads, n_kv_heads: the model's sizes.

    Example::

        graph = Graph.from_adapter(adapter, level="heads")
        scores = eap(adapter, graph, clean, corrupt, metric=metric)
        scores.circuit(top_n=50)
    """

    level: str
    senders: list[Sender]
    receivers: list[Receiver]
    edges: list[Edge]
    parallel: bool
    n_layers: int
    n_heads: int
    n_kv_heads: int
    _index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {e.name: i for i, e in enumerate(self.edges)}

    @classmethod
    def from_adapter(cls, adapter: Adapter, level: Level = "heads") -> Graph:
        """The graph of ``adapter``'s model at ``level``.

        Example::

            graph = Graph.from_adapter(adapter, level="heads")
            len(graph.edges)        # Gemma 3 270M: 4,861 edges from 91 senders to 109 receivers
            graph.edges[0].name     # 'input->a0.h0'
        """
        if level not in LEVELS:
            raise InputError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        n, h, h_kv = adapter.n_layers, adapter.n_heads, adapter.n_kv_heads
        parallel = adapter.anatomy.is_parallel(adapter.model.config)
        senders = [Sender("input", "input", -1)]
        receivers: list[Receiver] = []
        for layer in range(n):
            if level == "components":
                senders.append(Sender(f"a{layer}", "attn", layer))
                receivers.append(Receiver(f"a{layer}", "attn", layer, node=f"a{layer}"))
            else:
                senders += [Sender(f"a{layer}.h{hd}", "head", layer, hd) for hd in range(h)]
                receivers += _head_receivers(layer, h, h_kv, level)
            senders.append(Sender(f"m{layer}", "mlp", layer))
            receivers.append(Receiver(f"m{layer}", "mlp", layer, node=f"m{layer}"))
        receivers.append(Receiver("logits", "logits", n, node="logits"))
        edges = [Edge(s, r) for r in receivers for s in senders if s.order < r.order(parallel)]
        return cls(level, senders, receivers, edges, parallel, n, h, h_kv)

    def index(self, edges: str | Edge | list[str | Edge] | tuple) -> list[int]:
        """Indices of edges given by name (``"a0.h1->m3"``) or as :class:`Edge`."""
        items = [edges] if isinstance(edges, (str, Edge)) else list(edges)
        out = []
        for e in items:
            name = e.name if isinstance(e, Edge) else e
            if name not in self._index:
                raise InputError(
                    f"unknown edge {name!r} at level {self.level!r}; edges look like "
                    f"{self.edges[0].name!r} or {self.edges[-1].name!r} (graph.edges lists all)"
                )
            out.append(self._index[name])
        return out

    def to_networkx(
        self, edges: list[int] | None = None, weights: list[float] | None = None
    ) -> nx.DiGraph:
        """The graph (or the ``edges`` given) as a networkx ``DiGraph`` over component nodes.

        Receivers that are one input of a node (``a3.h1.q``) are merged into that node, and each
        key/value head feeds the query heads of its group. Edge attribute ``weight`` is the
        score when ``weights`` (one per edge in ``edges``) is given.
        """
        import networkx as nx

        g = nx.DiGraph()
        g.add_node("input")
        g.add_nodes_from(s.name for s in self.senders)
        g.add_node("logits")
        chosen = range(len(self.edges)) if edges is None else edges
        for k, i in enumerate(chosen):
            e = self.edges[i]
            w = 1.0 if weights is None else float(weights[k])
            node = e.receiver.node
            if g.has_edge(e.sender.name, node):
                g[e.sender.name][node]["weight"] += w
            else:
                g.add_edge(e.sender.name, node, weight=w)
        group = max(1, self.n_heads // max(1, self.n_kv_heads))
        for r in self.receivers:  # a key/value head feeds every query head of its group
            if r.node.startswith("a") and ".kv" in r.node and r.node in g:
                layer, kv = r.layer, int(r.node.split(".kv")[1].split(".")[0])
                for hd in range(kv * group, (kv + 1) * group):
                    g.add_edge(r.node, f"a{layer}.h{hd}", weight=0.0, internal=True)
        return g


def _head_receivers(layer: int, h: int, h_kv: int, level: str) -> list[Receiver]:
    a = f"a{layer}"
    if level == "qkv":
        out = [Receiver(f"{a}.h{hd}.q", "qkv", layer, hd, "q", f"{a}.h{hd}") for hd in range(h)]
        for g in range(h_kv):
            kv = f"{a}.kv{g}" if h_kv != h else f"{a}.h{g}"
            out += [Receiver(f"{kv}.{p}", "qkv", layer, g, p, kv) for p in "kv"]
        return out
    if h_kv == h:
        return [Receiver(f"{a}.h{hd}", "qkv", layer, hd, "qkv", f"{a}.h{hd}") for hd in range(h)]
    out = [Receiver(f"{a}.h{hd}", "qkv", layer, hd, "q", f"{a}.h{hd}") for hd in range(h)]
    return out + [Receiver(f"{a}.kv{g}", "qkv", layer, g, "kv", f"{a}.kv{g}") for g in range(h_kv)]
