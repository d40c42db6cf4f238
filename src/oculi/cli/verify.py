"""``oculi verify``: does oculi read this model exactly? A parity report."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import (
    FiniteFloat,
    emit_json,
    json_option,
    load_adapter,
    model_options,
)


@click.command()
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option(
    "--prompt",
    "-p",
    "prompts",
    multiple=True,
    help="A prompt to check (repeatable; default: two built-in prompts).",
)
@click.option(
    "--tolerance",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Largest relative difference accepted (default 1e-5 fp32, 2e-2 half).",
)
@model_options
@json_option
def verify(
    model_arg: str | None,
    prompts: tuple[str, ...],
    tolerance: float | None,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Compare oculi's captures with the model's own hidden states, attentions (eager) and
    logits, and a padded batch with single prompts. Exit status 1 on a mismatch.

    \b
    Examples:
      oculi verify
      oculi verify ./my-llama --prompt "Hello there" --json
    """
    from oculi.experiments.parity import verify as run_verify

    adapter = load_adapter(**{**model_opts, "model": model_arg or model_opts["model"]})
    report = run_verify(adapter, list(prompts) or None, tolerance=tolerance)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(f"{report.model} ({report.dtype}, {report.device})")
        place = report.placement
        if isinstance(place.get("device_map"), dict):
            for device, modules in place["device_map"].items():
                click.echo(f"  on {device}: {modules}")
        if place.get("offloaded", "none") != "none":
            click.echo(f"  offloaded: {place['offloaded']}")
        if place.get("quantization"):
            click.echo(f"  quantization: {place['quantization']}")
        click.echo(report.table())
    if not report.ok:
        raise SystemExit(1)
