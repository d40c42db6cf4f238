"""Circuit graphs (seed 003): heads and MLPs as nodes, composition or path-patching effects
as edges, laid out by layer from left to right (networkx, the ``[viz]`` extra).

::

    graph = circuit_graph(dla.heads, connections, mlp=dla.mlp, top_k=10)
    draw_circuit(graph)

``connections[l1, h1, l2, h2]`` is how strongly head ``(l1, h1)`` feeds head ``(l2, h2)``
(a composition score, or a path-patching effect with ``(l2, h2)`` as receiver); only pairs
with ``l1 < l2`` are read. Node ``importance`` is what ranks components (e.g. direct logit
attribution or patching recovery).
"""

from __future__ import annotations

from typing import Any

from oculi.visualize._common import array, new_axes, optional


def circuit_graph(
    importance: Any,
    connections: Any = None,
    *,
    mlp: Any = None,
    top_k: int = 10,
    min_edge: float = 0.0,
    edges_per_node: int = 3,
) -> Any:
    """The ``top_k`` most important heads (and MLPs) with their strongest connections.

    Args:
        importance: ``[L, H]`` per-head importance (``|value|`` ranks them).
        connections: ``[L, H, L, H]`` sender → receiver strengths, or ``None`` for no edges
            between heads.
        mlp: ``[L]`` per-MLP importance; MLPs rank alongside the heads.
        top_k: how many components become nodes.
        min_edge: drop edges weaker than this (``|strength|``).
        edges_per_node: keep each receiver's strongest incoming edges only.

    Returns:
        A ``networkx.DiGraph``; nodes ``"L3H1"``/``"MLP3"`` with ``layer``, ``head`` (None for
        MLPs), ``kind`` and ``importance``; edges with ``weight``.
    """
    nx = optional("networkx")
    heads = array(importance)
    candidates: list[tuple[float, str, int, int | None, float]] = [
        (abs(float(heads[layer, h])), f"L{layer}H{h}", layer, h, float(heads[layer, h]))
        for layer in range(heads.shape[0])
        for h in range(heads.shape[1])
    ]
    if mlp is not None:
        candidates += [
            (abs(float(v)), f"MLP{layer}", layer, None, float(v))
            for layer, v in enumerate(array(mlp))
        ]
    graph = nx.DiGraph()
    for _, name, layer, head, value in sorted(candidates, reverse=True)[:top_k]:
        kind = "mlp" if head is None else "head"
        graph.add_node(name, layer=layer, head=head, kind=kind, importance=value)
    if connections is not None:
        strength = array(connections)
        nodes = [n for n, d in graph.nodes(data=True) if d["kind"] == "head"]
        for receiver in nodes:
            rl, rh = graph.nodes[receiver]["layer"], graph.nodes[receiver]["head"]
            incoming = [
                (
                    abs(float(strength[d["layer"], d["head"], rl, rh])),
                    s,
                    float(strength[d["layer"], d["head"], rl, rh]),
                )
                for s, d in ((s, graph.nodes[s]) for s in nodes)
                if d["layer"] < rl
            ]
            for size, sender, value in sorted(incoming, reverse=True)[:edges_per_node]:
                if size > min_edge:
                    graph.add_edge(sender, receiver, weight=value)
    # every node in a layer writes to the logits through the residual stream
    graph.add_node("logits", layer=heads.shape[0], head=None, kind="output", importance=0.0)
    for name, data in list(graph.nodes(data=True)):
        if data["kind"] != "output":
            graph.add_edge(name, "logits", weight=data["importance"])
    return graph


def circuit_layout(graph: Any) -> dict[str, tuple[float, float]]:
    """Positions: ``x`` = layer, nodes of one layer spread vertically (heads, then the MLP).

    ::

        pos = circuit_layout(circuit_graph(importance))    # {"L3H1": (3.0, 0.0), ..., "logits": (L, 0.0)}
    """
    by_layer: dict[int, list[str]] = {}
    for name, data in graph.nodes(data=True):
        by_layer.setdefault(data["layer"], []).append(name)
    pos = {}
    for layer, names in by_layer.items():
        names.sort(key=lambda n: (graph.nodes[n]["kind"] == "mlp", graph.nodes[n]["head"] or 0))
        for i, name in enumerate(names):
            pos[name] = (float(layer), (len(names) - 1) / 2 - i)
    return pos


def draw_circuit(graph: Any, ax: Any = None, title: str = "circuit") -> Any:
    """Draw a :func:`circuit_graph`: colour = importance sign and size, width = edge weight.

    ::

        draw_circuit(circuit_graph(importance, connections))   # importance [L, H], connections [L, H, L, H]
    """
    nx = optional("networkx")
    ax = new_axes(ax, 10.0, 5.0)
    pos = circuit_layout(graph)
    values = [graph.nodes[n]["importance"] for n in graph.nodes]
    top = max([abs(v) for v in values] + [1e-9])
    colours = [
        "#9ca3af" if graph.nodes[n]["kind"] == "output" else ("#2563eb" if v >= 0 else "#dc2626")
        for n, v in zip(graph.nodes, values)
    ]
    sizes = [300 + 900 * abs(v) / top for v in values]
    weights = [abs(d["weight"]) for _, _, d in graph.edges(data=True)]
    wmax = max(weights + [1e-9])
    nx.draw_networkx_nodes(graph, pos, ax=ax, node_color=colours, node_size=sizes, alpha=0.85)
    nx.draw_networkx_labels(graph, pos, ax=ax, font_size=8, font_color="white")
    nx.draw_networkx_edges(
        graph, pos, ax=ax, width=[0.5 + 3 * w / wmax for w in weights], alpha=0.5,
        arrows=True, arrowsize=12, node_size=sizes,
    )  # fmt: skip
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.tick_params(left=False, labelleft=False, bottom=True, labelbottom=True)
    return ax


def discovered_graph(circuit: Any) -> Any:
    """A discovered circuit (:class:`oculi.discovery.Circuit`) as a :func:`circuit_graph`-style
    graph for :func:`draw_circuit`: component nodes (``input``, ``a3.h1``, ``a3.kv0``, ``m3``,
    ``logits``) with ``layer`` and ``kind``, ``importance`` = the sum of the scores of the
    circuit's edges into and out of the node, edge ``weight`` = the edge's score."""
    g = circuit.to_networkx()
    n_layers = circuit.graph.n_layers
    for name in g.nodes:
        g.nodes[name].update(_node_place(name, n_layers))
    for name in g.nodes:
        g.nodes[name]["importance"] = sum(
            abs(d.get("weight", 0.0)) for *_, d in g.in_edges(name, data=True)
        ) + sum(abs(d.get("weight", 0.0)) for *_, d in g.out_edges(name, data=True))
    g.remove_nodes_from([n for n in list(g.nodes) if g.degree(n) == 0])
    return g


def _node_place(name: str, n_layers: int) -> dict[str, Any]:
    if name == "input":
        return {"layer": -1, "head": None, "kind": "output"}
    if name == "logits":
        return {"layer": n_layers, "head": None, "kind": "output"}
    layer = int(name[1:].split(".")[0])
    if name.startswith("m"):
        return {"layer": layer, "head": None, "kind": "mlp"}
    part = name.split(".")[1] if "." in name else ""
    if part.startswith("kv"):
        return {"layer": layer, "head": 1000 + int(part[2:]), "kind": "head"}
    return {"layer": layer, "head": int(part[1:]) if part.startswith("h") else None, "kind": "head"}


def faithfulness_curves(curves: dict[str, Any], ax: Any = None, title: str = "faithfulness") -> Any:
    """One line per method: circuit size (edges after pruning) against faithfulness.

    ``curves`` maps a method name to its :meth:`CircuitScores.faithfulness_curve` list.
    """
    ax = new_axes(ax, 6.4, 4.0)
    for method, circuits in curves.items():
        xs = [c.n_edges for c in circuits]
        ys = [c.faithfulness for c in circuits]
        ax.plot(xs, ys, marker="o", label=method)
    ax.axhline(1.0, color="#9ca3af", lw=0.8, ls="--")
    ax.axhline(0.0, color="#9ca3af", lw=0.8)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.set_xlabel("edges in the circuit")
    ax.set_ylabel("faithfulness (1 = clean, 0 = corrupt)")
    ax.set_title(title)
    ax.legend()
    return ax
