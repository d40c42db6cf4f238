"""``oculi discover``: automated circuit discovery from a clean/corrupt contrast."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import FiniteFloat, emit_json, json_option, load_adapter, model_options

METHODS = ("eap", "eap-ig", "atp-star", "acdc")


@click.command()
@click.option("--clean", required=True, help="The prompt whose behaviour the circuit carries.")
@click.option("--corrupt", required=True, help="The contrast prompt (same token length).")
@click.option("--answer", required=True, help="The clean answer token (e.g. ' Mary').")
@click.option("--wrong", required=True, help="The corrupt answer token (e.g. ' John').")
@click.option(
    "--method", type=click.Choice(METHODS), default="eap", show_default=True,
    help="How edges (AtP*: nodes) are scored.",
)  # fmt: skip
@click.option(
    "--level", type=click.Choice(["components", "heads", "qkv"]), default="heads",
    show_default=True, help="Graph detail (AtP* always uses qkv).",
)  # fmt: skip
@click.option(
    "--recover", type=click.FloatRange(0, 1, min_open=True), default=0.8, show_default=True,
    help="Keep the smallest circuit reaching this faithfulness (not ACDC).",
)  # fmt: skip
@click.option("--steps", type=click.IntRange(1, 1000), default=5, show_default=True,
              help="EAP-IG integration points.")  # fmt: skip
@click.option("--threshold", type=FiniteFloat(min=0), default=0.05, show_default=True,
              help="ACDC's damage threshold, in logit-difference units.")  # fmt: skip
@click.option("--top", type=click.IntRange(min=0), default=15, show_default=True,
              help="Edges (nodes) listed.")  # fmt: skip
@click.option("--figure", type=click.Path(dir_okay=False), default=None,
              help="Also draw the circuit to this PNG/SVG file.")  # fmt: skip
@model_options
@json_option
def discover(
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str,
    method: str,
    level: str,
    recover: float,
    steps: int,
    threshold: float,
    top: int,
    figure: str | None,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Find the circuit that carries ANSWER over WRONG: score every edge, keep the smallest
    circuit that recovers the clean logit difference, measured by exact edge patching.

    \b
    Example:
      oculi discover --clean "When Mary and John went to the store, John gave a drink to" \\
                     --corrupt "When Mary and John went to the store, Mary gave a drink to" \\
                     --answer " Mary" --wrong " John" --method eap-ig --level heads
    """
    from oculi import discovery, patching

    adapter = load_adapter(**model_opts)
    metric = patching.logit_diff(answer, wrong)
    graph = discovery.Graph.from_adapter(adapter, "qkv" if method == "atp-star" else level)  # type: ignore[arg-type]
    args = (adapter, graph, clean, corrupt)
    if method == "eap":
        scores = discovery.eap(*args, metric=metric)
    elif method == "eap-ig":
        scores = discovery.eap_ig(*args, metric=metric, steps=steps)
    elif method == "atp-star":
        scores = discovery.atp_star(*args, metric=metric)
    else:
        scores = discovery.acdc(*args, metric=metric, threshold=threshold)
    circuit = scores.circuit() if method == "acdc" else scores.circuit(recover=recover)
    if figure is not None:
        _draw(circuit, figure)
    if as_json:
        emit_json(
            {
                "method": method,
                "level": graph.level,
                "clean_metric": scores.clean_value,
                "corrupt_metric": scores.corrupt_value,
                "circuit": {
                    "edges": circuit.names,
                    "n_edges": circuit.n_edges,
                    "n_nodes": circuit.n_nodes,
                    "faithfulness": circuit.faithfulness,
                },
                "top": scores.top(top),
                "info": {k: v for k, v in scores.info.items() if k != "kept"},
            }
        )
        return
    click.echo(
        f"logit diff {answer!r} - {wrong!r}: clean {scores.clean_value:.3f}, "
        f"corrupt {scores.corrupt_value:.3f}; {len(graph.edges)} edges at level {graph.level!r}"
    )
    click.echo(
        f"circuit ({method}): {circuit.n_edges} edges, {circuit.n_nodes} nodes, "
        f"faithfulness {circuit.faithfulness:.3f}"
    )
    click.echo(f"top {'nodes' if scores.nodes is not None else 'edges'} by |score|:")
    for name, value in scores.top(top):
        click.echo(f"  {name:<28} {value:+.4f}")


def _draw(circuit: Any, path: str) -> None:
    from oculi.capture.io.files import write_atomically
    from oculi.experiments.figures import new_figure

    fig, ax = new_figure(10.0, 5.0)
    circuit.plot(ax=ax)
    suffix = path.rsplit(".", 1)[-1].lower() if "." in path else "png"
    write_atomically(
        path, lambda tmp: fig.savefig(tmp, format=suffix), overwrite=True, what="the figure"
    )
