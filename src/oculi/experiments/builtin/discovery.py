"""``circuit_discovery``: automated circuit discovery with several methods side by side.

For a clean/corrupt contrast (one pair or equal-length lists), each method in ``methods``
scores the graph at ``level`` (:mod:`oculi.discovery`), picks the smallest circuit reaching
``recover`` of the clean behaviour (ACDC: its own circuit at ``acdc_threshold``), and measures
a faithfulness curve over ``curve`` sizes, all by exact edge patching. ``agreement`` compares
the edge methods with exact single-edge patching on the union of their ``exact_top`` best
edges (Spearman's ρ, SciPy), and AtP* with exact node patching on every node.

Figures: ``faithfulness`` (one curve per method) and ``circuit`` (the first method's circuit).

Run it from the shell (``configs/circuit_discovery_ioi.yaml`` holds an example)::

    oculi run circuit_discovery --config configs/circuit_discovery_ioi.yaml
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from oculi.experiments.builtin.causal import _ContrastConfig
from oculi.experiments.figures import new_figure
from oculi.experiments.registry import Experiment, Outcome, register_experiment

Method = Literal["eap", "eap_ig", "atp_star", "acdc"]
Level = Literal["components", "heads", "qkv"]


class CircuitDiscoveryConfig(_ContrastConfig):
    """Keys of a ``circuit_discovery`` config.

    Attributes:
        clean, corrupt: a prompt each, or lists of prompts of one token length.
        answer, wrong, metric: as for activation patching.
        level: ``components``, ``heads`` or ``qkv`` (AtP* always scores the ``qkv`` graph).
        methods: any of ``eap``, ``eap_ig``, ``atp_star``, ``acdc``.
        steps: EAP-IG's integration points; acdc_threshold: ACDC's damage threshold (in the
            metric's units).
        recover: each method's circuit is the smallest reaching this faithfulness.
        curve: circuit sizes (edges; nodes for AtP*) of the faithfulness curves.
        exact_top: edges per method checked against exact single-edge patching.
    """

    clean: str | list[str] = Field(min_length=1)  # type: ignore[assignment]
    corrupt: str | list[str] = Field(min_length=1)  # type: ignore[assignment]
    level: Level = "heads"
    methods: list[Method] = Field(default=["eap", "eap_ig", "atp_star", "acdc"], min_length=1)
    steps: int = Field(default=5, ge=1, le=1000)
    acdc_threshold: float = Field(default=0.05, ge=0)
    recover: float = Field(default=0.8, gt=0, le=1)
    curve: list[int] = Field(default=[5, 10, 20, 50, 100, 200, 500], min_length=1)
    exact_top: int = Field(default=500, ge=0)


def _score(adapter: Any, cfg: CircuitDiscoveryConfig, method: str, graphs: dict) -> Any:
    from oculi import discovery

    metric = cfg.make_metric()
    args = (adapter, graphs["qkv" if method == "atp_star" else cfg.level], cfg.clean, cfg.corrupt)
    if method == "eap":
        return discovery.eap(*args, metric=metric)
    if method == "eap_ig":
        return discovery.eap_ig(*args, metric=metric, steps=cfg.steps)
    if method == "atp_star":
        return discovery.atp_star(*args, metric=metric)
    return discovery.acdc(*args, metric=metric, threshold=cfg.acdc_threshold)


def _agreement(results: dict[str, Any], k: int) -> dict[str, Any]:
    """Spearman's ρ of each edge method with exact single-edge patching on the union of their
    top-``k`` edges, and of AtP* with exact node patching."""
    from scipy.stats import spearmanr

    out: dict[str, Any] = {}
    edge_methods = {m: s for m, s in results.items() if m in ("eap", "eap_ig")}
    if edge_methods and k > 0:
        union = sorted({i for s in edge_methods.values() for i in s.ranked()[:k]})
        ref = next(iter(edge_methods.values()))
        exact = ref.exact(union, progress=True)
        for m, s in edge_methods.items():
            rho = spearmanr(s.values[union].numpy(), exact.numpy()).statistic
            out[m] = {"spearman": float(rho), "edges": len(union)}
    if "atp_star" in results:
        s = results["atp_star"]
        exact_nodes = s.exact_nodes(progress=True)
        names = list(exact_nodes)
        rho = spearmanr([s.nodes[n] for n in names], [abs(exact_nodes[n]) for n in names]).statistic
        out["atp_star"] = {"spearman_abs": float(rho), "nodes": len(names)}
    return out


@register_experiment("circuit_discovery")
class CircuitDiscovery(Experiment):
    Config = CircuitDiscoveryConfig
    direction = "corrupt sender outputs into the clean run, edge by edge"

    def run(self, adapter: Any, cfg: CircuitDiscoveryConfig) -> Outcome:
        from oculi.discovery import Graph
        from oculi.visualize.circuit import faithfulness_curves

        levels: set[Level] = {cfg.level} | ({"qkv"} if "atp_star" in cfg.methods else set())
        graphs = {lv: Graph.from_adapter(adapter, lv) for lv in levels}
        results: dict[str, Any] = {}
        curves: dict[str, Any] = {}
        methods: dict[str, Any] = {}
        numbers: dict[str, Any] = {"level": cfg.level, "methods": methods}
        for method in cfg.methods:
            start = time.perf_counter()
            scores = _score(adapter, cfg, method, graphs)
            seconds = time.perf_counter() - start
            circuit = scores.circuit() if method == "acdc" else scores.circuit(recover=cfg.recover)
            curves[method] = scores.faithfulness_curve(cfg.curve)
            results[method] = scores
            methods[method] = {
                "seconds": seconds,
                "circuit": {
                    "edges": circuit.names,
                    "n_edges": circuit.n_edges,
                    "n_nodes": circuit.n_nodes,
                    "faithfulness": circuit.faithfulness,
                },
                "curve": [
                    {"n": n, "n_edges": c.n_edges, "faithfulness": c.faithfulness}
                    for n, c in zip(cfg.curve, curves[method])
                ],
                "top": scores.top(20),
                "info": {k: v for k, v in scores.info.items() if k != "kept"},
            }
        first = results[cfg.methods[0]]
        numbers["clean_metric"] = first.clean_value
        numbers["corrupt_metric"] = first.corrupt_value
        numbers["agreement"] = _agreement(results, cfg.exact_top)
        fig_curve, ax = new_figure(6.4, 4.0)
        faithfulness_curves(curves, ax=ax, title=f"{cfg.level} circuits")
        best = results[cfg.methods[0]]
        chosen = best.circuit() if cfg.methods[0] == "acdc" else best.circuit(recover=cfg.recover)
        fig_graph, ax2 = new_figure(max(8.0, 0.55 * adapter.n_layers + 3), 5.0)
        chosen.plot(ax=ax2, title=f"{cfg.methods[0]}: {chosen.n_edges} edges, "
                    f"faithfulness {chosen.faithfulness:.2f}")  # fmt: skip
        prompt = cfg.clean if isinstance(cfg.clean, str) else cfg.clean[0]
        return Outcome(numbers, {"faithfulness": fig_curve, "circuit": fig_graph}, prompt)
