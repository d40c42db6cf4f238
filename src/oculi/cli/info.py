"""``oculi info``: what a model is, in the terms oculi uses."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import emit_json, json_option, model_options


@click.command()
@click.argument("model_arg", metavar="[MODEL]", required=False)
@model_options
@json_option
def info(
    model_arg: str | None,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Load a model and print its architecture: family, layers, heads, widths, parameters.

    \b
    Examples:
      oculi info
      oculi info ./my-llama --json
    """
    from oculi.analyzer.core import model_info
    from oculi.cli._options import load_adapter

    facts = model_info(load_adapter(**{**model_opts, "model": model_arg or model_opts["model"]}))
    if as_json:
        emit_json(facts)
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if key == "n_params":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        if isinstance(value, dict):  # a device map: one line per device
            value = "; ".join(f"{device}: {modules}" for device, modules in value.items())
        click.echo(f"{key.ljust(width)}  {value}")
