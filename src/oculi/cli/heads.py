"""``oculi heads``: what each attention head does on a prompt."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import SEED, emit_json, json_option, load_adapter, model_options, table


@click.command()
@click.argument("prompt")
@click.option(
    "--top",
    "top_k",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Heads listed per score.",
)
@click.option(
    "--induction-length",
    default=20,
    show_default=True,
    type=click.IntRange(min=0),
    help="Random tokens repeated once for the induction score (0: skip).",
)
@click.option(
    "--seed", default=0, show_default=True, type=SEED, help="Seed of the random sequence."
)
@model_options
@json_option
def heads(
    prompt: str,
    top_k: int,
    induction_length: int,
    seed: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Score every head: previous-token, BOS (attention sink), recent-token and induction.

    Scores are mean attention to the pattern's target, in [0, 1]; induction is measured on a
    seeded random sequence repeated once.

    \b
    Example:
      oculi heads "The quick brown fox jumps over the lazy dog" --top 3
    """
    from oculi.experiments.builtin.heads import head_scores, top_heads

    adapter = load_adapter(**model_opts)
    scores = head_scores(adapter, prompt, induction_length=induction_length, seed=seed, window=3)
    top = {name: top_heads(s, top_k) for name, s in scores.items()}
    if as_json:
        emit_json({"prompt": prompt, "scores": scores, "top": top})
        return
    rows = [
        [name, f"L{layer}.H{head}", f"{score:.3f}"]
        for name, best in top.items()
        for layer, head, score in best
    ]
    click.echo(table(rows, ["score", "head", "value"]))
