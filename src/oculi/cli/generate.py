"""``oculi generate``: greedy generation, optionally steered, ablated or Q/K-scaled."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import (
    FiniteFloat,
    emit_json,
    json_option,
    load_adapter,
    model_options,
    parse_head,
    parse_scaled_head,
)


@click.command()
@click.argument("prompt")
@click.option(
    "--max-new-tokens",
    "-n",
    default=20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens generated.",
)
@click.option(
    "--steer",
    nargs=2,
    multiple=True,
    metavar="POSITIVE NEGATIVE",
    help="Add the steering vector mean(POSITIVE) - mean(NEGATIVE) (repeatable: pairs are pooled).",
)
@click.option(
    "--layer",
    "steer_layer",
    type=int,
    default=None,
    help="Layer of the steering vector (default: the middle layer).",
)
@click.option(
    "--coefficient",
    default=0.25,
    type=FiniteFloat(),
    show_default=True,
    help="Steering strength: the added vector's length as a multiple of the residual's "
    "typical norm at --layer (0.25: a quarter of it).",
)
@click.option(
    "--ablate", multiple=True, metavar="L.H", help="Zero-ablate head H of layer L (repeatable)."
)
@click.option(
    "--ablate-mode",
    type=click.Choice(["zero", "mean"]),
    default="zero",
    show_default=True,
    help="How --ablate removes a head.",
)
@click.option(
    "--scale",
    multiple=True,
    metavar="L.H=ALPHA",
    help="Scale head H's attention logits in layer L (>1 sharpens, <1 flattens).",
)
@click.option("--compare", is_flag=True, help="Also print the plain (unmodified) continuation.")
@model_options
@json_option
def generate(
    prompt: str,
    max_new_tokens: int,
    steer: tuple[tuple[str, str], ...],
    steer_layer: int | None,
    coefficient: float,
    ablate: tuple[str, ...],
    ablate_mode: str,
    scale: tuple[str, ...],
    compare: bool,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Continue PROMPT greedily, with interventions applied at every step (KV cache on).

    \b
    Examples:
      oculi generate "Today I feel so" --steer "I am so happy" "I am so sad" --layer 6 --coefficient 0.25
      oculi generate "The capital of France is" --ablate 3.1 --scale 5.2=1.5 --compare
    """
    ablations = [parse_head(a, "--ablate") for a in ablate]
    scalings = [parse_scaled_head(s) for s in scale]
    adapter = load_adapter(**model_opts)
    interventions = _interventions(
        adapter, steer, steer_layer, coefficient, ablations, ablate_mode, scalings
    )
    from oculi.intervention import InterventionContext

    baseline = adapter.generate(prompt, max_new_tokens=max_new_tokens) if compare else None
    with InterventionContext(adapter, interventions):
        text = adapter.generate(prompt, max_new_tokens=max_new_tokens)
    if as_json:
        emit_json(
            {
                "prompt": prompt,
                "text": text,
                "baseline": baseline,
                "interventions": [repr(i) for i in interventions],
            }
        )
        return
    if interventions:
        click.echo("with " + ", ".join(repr(i) for i in interventions), err=True)
    if baseline is not None:
        click.echo(f"plain:    {prompt}{baseline}")
        click.echo(f"modified: {prompt}{text}")
    else:
        click.echo(f"{prompt}{text}")


def _interventions(
    adapter: Any,
    steer: tuple[tuple[str, str], ...],
    layer: int | None,
    coefficient: float,
    ablations: list[tuple[int, int]],
    ablate_mode: str,
    scalings: list[tuple[int, int, float]],
) -> list[Any]:
    from oculi.intervention import HeadAblation, SpectraScaler, SteeringVector

    out: list[Any] = []
    if steer:
        if layer is None:
            layer = adapter.n_layers // 2
        out.append(
            SteeringVector.from_contrast(
                adapter,
                [p for p, _ in steer],
                [n for _, n in steer],
                layer=layer,
                coefficient=coefficient,
            )
        )
    elif layer is not None:
        raise click.BadParameter("--layer is the steering layer; it needs --steer")
    method: Any = ablate_mode  # click.Choice checked it
    out += [HeadAblation(layer=lay, head=h, method=method) for lay, h in ablations]
    out += [SpectraScaler(layer=lay, head=h, alpha=a) for lay, h, a in scalings]
    return out
