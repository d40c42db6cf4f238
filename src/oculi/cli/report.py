"""``oculi report``: one self-contained HTML page explaining a prediction."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import check_output_file, load_adapter, model_options


@click.command()
@click.argument("prompt")
@click.option(
    "--output",
    "-o",
    default="report.html",
    show_default=True,
    metavar="PATH",
    help="Where the HTML page is written.",
)
@click.option(
    "--target",
    "-t",
    default=None,
    help="The answer token explained (default: the model's top prediction).",
)
@click.option(
    "--subject",
    "-s",
    default=None,
    help="The substring causal tracing corrupts (default: all but the last token).",
)
@click.option(
    "--samples",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Noise samples of the causal tracing.",
)
@click.option(
    "--corrupt",
    "-c",
    default=None,
    help="A contrasting prompt of the same token length: adds the circuit that carries the "
    "answer (EAP-IG, exact faithfulness).",
)
@model_options
def report(
    prompt: str,
    output: str,
    target: str | None,
    subject: str | None,
    samples: int,
    corrupt: str | None,
    **model_opts: Any,
) -> None:
    """Write an offline HTML report: top next tokens, logit lens, which layers and heads write
    the answer, attention patterns of the important heads, and a causal-tracing heatmap.

    \b
    Example:
      oculi report "The Eiffel Tower is located in the city of" -s "The Eiffel Tower" -o eiffel.html
    """
    from oculi.visualize.report import write_report

    check_output_file(output)
    adapter = load_adapter(**model_opts)
    path = write_report(
        adapter, prompt, output, target=target, subject=subject, samples=samples, corrupt=corrupt
    )
    click.echo(f"wrote {path}")
