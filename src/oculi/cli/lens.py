"""``oculi lens``: the logit lens, one target token followed through the layers."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import (
    POSITION,
    check_position,
    emit_json,
    json_option,
    load_adapter,
    model_options,
    table,
)


@click.command()
@click.argument("prompt")
@click.option(
    "--target",
    "-t",
    default=None,
    help="The answer token to follow (mind the leading space: ' Paris'). "
    "Default: the model's own top prediction.",
)
@click.option(
    "--position",
    default=-1,
    show_default=True,
    type=POSITION,
    help="Position read (-1: the last).",
)
@model_options
@json_option
def lens(
    prompt: str,
    target: str | None,
    position: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Logit lens: each layer's top-1 guess and the target's probability and rank.

    \b
    Example:
      oculi lens "The Eiffel Tower is located in the city of" --target " Paris"
    """
    import oculi

    adapter = load_adapter(**model_opts)
    check_position(position, len(adapter.to_str_tokens(prompt)))
    if target is None:
        target_id = int(adapter.forward(prompt)[position].argmax())
    else:
        target_id = adapter.to_single_token(target)
    result = oculi.logit_lens(adapter, prompt, target_id, position=position)
    if as_json:
        emit_json({"prompt": prompt, **result.to_dict()})
        return
    rows = [
        [layer, repr(top), f"{float(p):.4f}", int(r)]
        for layer, top, p, r in zip(result.layers, result.top1, result.probs, result.ranks)
    ]
    click.echo(f"target {result.target!r} (id {result.target_id}) at position {result.position}")
    click.echo(table(rows, ["layer", "top-1", "p(target)", "rank"]))
    click.echo(f"crossover layer: {result.crossover_layer}")
