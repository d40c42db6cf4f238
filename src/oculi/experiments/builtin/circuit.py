"""``circuit``: the components that write a prediction, how they connect, what each promotes.

Seed 003's circuit discovery, from one forward pass and the weights:

1. **Components.** Exact direct logit attribution at the last position
   (:mod:`oculi.analysis.dla`): each head's and each MLP's share of the answer's logit (of
   ``answer − wrong`` when ``wrong`` is given). Heads and MLPs are ranked together by
   ``|share|`` and the ``top_k`` kept; ``rest`` is everything else (the other heads and MLPs,
   the embedding, the output projections' biases, the constant), so the shares and ``rest``
   add up to the model's logit.
2. **Connections.** For every earlier → later pair of chosen heads, the weight-based Q-, K- and
   V-composition scores (:mod:`oculi.analysis.composition`: ``‖W_OV W_read‖ / (‖W_OV‖
   ‖W_read‖)``, in [0, 1]). An edge's ``score`` is the largest of the three (``kind`` says
   which); edges scoring above ``threshold`` are kept. Scores are only comparable with each
   other (random matrices score above 0), so ``composition_median`` gives each kind's median
   over all earlier → later pairs of heads of the model. MLPs have no composition score.
3. **Function.** For each component, the tokens its direct write at the last position raises
   most (``promoted``: ``[token, id, Δlogit]``).

The figure ``circuit`` is the graph of :func:`oculi.visualize.circuit.draw_circuit`: the
components by layer, coloured by the sign of their share, composition edges between heads and
every component's edge into the logits.

Run it from the shell or from Python (``configs/circuit_factual.yaml`` holds an example)::

    oculi run circuit --config configs/circuit_factual.yaml --tag mine
    run_experiment("circuit", {"prompt": "The Eiffel Tower is located in the city of", "target": " Paris"})
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from oculi.experiments.builtin.attribution import answer_ids, head_capture
from oculi.experiments.config import ExperimentConfig
from oculi.experiments.figures import new_figure
from oculi.experiments.registry import Experiment, Outcome, register_experiment

KINDS = ("q", "k", "v")


class CircuitConfig(ExperimentConfig):
    """Keys of a ``circuit`` config.

    Attributes:
        prompt: the text; target: the answer token (default: the model's top prediction);
        wrong: a competing token, to attribute the logit difference ``target − wrong``.
        top_k: components kept (heads and MLPs together, largest ``|share|`` first).
        threshold: edges between chosen heads whose composition score exceeds it are kept.
        promoted: tokens listed per component (0: none).
    """

    prompt: str = Field(min_length=1)
    target: str | None = None
    wrong: str | None = None
    top_k: int = Field(default=10, ge=1)
    threshold: float = Field(default=0.0, ge=0, le=1)
    promoted: int = Field(default=10, ge=0)


def top_components(dla: Any, k: int) -> list[dict[str, Any]]:
    """The ``k`` heads and MLPs of largest ``|share|`` in a DLA result with ``.heads``:
    ``{"name": "L3H1" | "MLP3", "kind": "head" | "mlp", "layer", "head", "share"}``."""
    import torch

    from oculi.analysis import AttributionMethods

    n_heads = dla.heads.shape[1]
    grid = torch.cat([dla.heads, dla.mlp[:, None]], dim=1)  # column n_heads: the layer's MLP
    out = []
    for (row, col), share in AttributionMethods.top_attributions(grid, k):
        layer, head = int(dla.layers[row]), (None if col == n_heads else int(col))
        name = f"MLP{layer}" if head is None else f"L{layer}H{head}"
        kind = "mlp" if head is None else "head"
        out.append({"name": name, "kind": kind, "layer": layer, "head": head, "share": share})
    return out


def composition_edges(
    scores: dict[str, Any], components: list[dict[str, Any]], threshold: float
) -> list[dict[str, Any]]:
    """Edges between the chosen heads, strongest first: ``{"source", "target", "score",
    "kind", "q", "k", "v"}`` for each earlier → later pair whose largest composition score
    (``scores[kind][l1, h1, l2, h2]``) exceeds ``threshold``."""
    heads = [c for c in components if c["kind"] == "head"]
    edges = []
    for src in heads:
        for dst in heads:
            if src["layer"] >= dst["layer"]:
                continue
            at = (src["layer"], src["head"], dst["layer"], dst["head"])
            by_kind = {kind: float(scores[kind][at]) for kind in KINDS}
            kind = max(KINDS, key=by_kind.__getitem__)
            if by_kind[kind] > threshold:
                edges.append(
                    {"source": src["name"], "target": dst["name"], "score": by_kind[kind],
                     "kind": kind, **by_kind}
                )  # fmt: skip
    return sorted(edges, key=lambda e: -e["score"])


def _median_over_pairs(scores: dict[str, Any]) -> dict[str, float]:
    """Each kind's median over the pairs that can compose (earlier → later layer)."""
    import torch

    n_layers = next(iter(scores.values())).shape[0]
    layer = torch.arange(n_layers)
    later = layer[:, None, None, None] < layer[None, None, :, None]
    return {kind: float(s[later.expand_as(s)].median()) for kind, s in scores.items()}


def circuit_figure(dla: Any, scores: dict[str, Any], cfg: CircuitConfig, title: str) -> Any:
    """The circuit graph of the ``top_k`` components with the edges above ``threshold``."""
    import torch

    from oculi.visualize.circuit import circuit_graph, draw_circuit

    strongest = torch.maximum(scores["q"], torch.maximum(scores["k"], scores["v"]))
    graph = circuit_graph(
        dla.heads, strongest, mlp=dla.mlp, top_k=cfg.top_k, min_edge=cfg.threshold,
        edges_per_node=cfg.top_k,
    )  # fmt: skip
    fig, ax = new_figure(max(8.0, 0.55 * dla.heads.shape[0] + 3), 5.0)
    draw_circuit(graph, ax=ax, title=title)
    return fig


def promoted(adapter: Any, full: Any, component: dict[str, Any], k: int) -> list[list[Any]]:
    """``[[token, id, Δlogit], ...]``: the ``k`` tokens whose logits the component's direct
    write at the last position raises most (``AttributionMethods.promoted_tokens``)."""
    from oculi.analysis import AttributionMethods

    layer, head = component["layer"], component["head"]
    where = ("mlp", layer) if head is None else (layer, head)
    top = AttributionMethods.promoted_tokens(full, where, position=-1, k=k, adapter=adapter)
    return [[adapter.tokenizer.decode([t]), t, delta] for t, delta in top]  # type: ignore[misc]


def circuit_numbers(
    adapter: Any, cfg: CircuitConfig, full: Any, dla: Any, ids: tuple[int, int | None]
) -> dict[str, Any]:
    """The run's plain numbers but the edges: the answer, the components (with the tokens each
    promotes), ``rest``."""
    decode = adapter.tokenizer.decode
    target_id, wrong_id = ids
    components = top_components(dla, cfg.top_k)
    for c in components:
        c["promoted"] = promoted(adapter, full, c, cfg.promoted) if cfg.promoted else []
    return {
        "prompt": cfg.prompt,
        "target": decode([target_id]),
        "target_id": target_id,
        "wrong": None if wrong_id is None else decode([wrong_id]),
        "wrong_id": wrong_id,
        "logit": float(dla.logit),
        "components": components,
        "rest": float(dla.total) - sum(c["share"] for c in components),
        "note": dla.note,
    }


@register_experiment("circuit")
class Circuit(Experiment):
    Config = CircuitConfig

    def run(self, adapter: Any, cfg: CircuitConfig) -> Outcome:
        from oculi.analysis import AttributionMethods, CompositionAnalysis

        full = head_capture(adapter, cfg.prompt)
        ids = answer_ids(adapter, full, cfg.target, cfg.wrong)
        what = ids[0] if ids[1] is None else ids
        dla = AttributionMethods.direct_logit_attribution(full, what, position=-1, adapter=adapter)
        scores = CompositionAnalysis.all_composition_scores(adapter)
        numbers = circuit_numbers(adapter, cfg, full, dla, ids)
        numbers["threshold"] = cfg.threshold
        numbers["edges"] = composition_edges(scores, numbers["components"], cfg.threshold)
        numbers["composition_median"] = _median_over_pairs(scores)
        answer = (
            numbers["target"] if ids[1] is None else f"{numbers['target']} − {numbers['wrong']}"
        )
        fig = circuit_figure(dla, scores, cfg, f"circuit of {answer!r} after {cfg.prompt!r}")
        return Outcome(numbers, {"circuit": fig}, cfg.prompt)
