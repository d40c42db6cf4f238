"""``oculi attribute``: which layers, branches and heads write the answer (exact DLA)."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import emit_json, json_option, load_adapter, model_options, table


@click.command()
@click.argument("prompt")
@click.option("--target", "-t", default=None,
              help="The answer token (default: the model's top prediction).")  # fmt: skip
@click.option("--wrong", default=None,
              help="A competing token: attribute the logit difference target - wrong.")  # fmt: skip
@click.option("--top", "top_k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Heads (and neurons) listed.")  # fmt: skip
@click.option("--neurons", is_flag=True,
              help="Also attribute to every MLP neuron and list the largest.")  # fmt: skip
@model_options
@json_option
def attribute(
    prompt: str,
    target: str | None,
    wrong: str | None,
    top_k: int,
    neurons: bool,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Direct logit attribution at the last position: the target's logit split exactly into
    the embedding, each layer's attention and MLP, each head, and a constant.

    \b
    Example:
      oculi attribute "The Eiffel Tower is located in the city of" --target " Paris"
    """
    from oculi.experiments.builtin.attribution import (
        attribution_numbers,
        direct_logit_attribution,
    )

    adapter = load_adapter(**model_opts)
    dla, target_id, wrong_id = direct_logit_attribution(
        adapter, prompt, target, wrong, neurons=neurons
    )
    out = attribution_numbers(adapter, dla, target_id, wrong_id, top_k)
    if as_json:
        emit_json({"prompt": prompt, **out})
        return
    what = repr(out["target"]) + (f" - {out['wrong']!r}" if out["wrong"] is not None else "")
    click.echo(f"logit {what} = {out['logit']:.4f} (sum of the shares: {out['total']:.4f})")
    if out["note"]:
        click.echo(out["note"])
    rows = [
        [layer, f"{a:+.4f}", f"{m:+.4f}", f"{a + m:+.4f}"]
        for layer, a, m in zip(out["layers"], dla.attention.tolist(), dla.mlp.tolist())
    ]
    rows.append(["embed", "", "", f"{out['embedding']:+.4f}"])
    rows.append(["const", "", "", f"{out['bias']:+.4f}"])
    click.echo(table(rows, ["layer", "attention", "MLP", "total"]))
    click.echo("top heads: " + ", ".join(f"L{ly}.H{h} {v:+.3f}" for ly, h, v in out["top_heads"]))
    if "top_neurons" in out:
        top = out["top_neurons"]
        click.echo("top neurons: " + ", ".join(f"L{ly}.N{n} {v:+.3f}" for ly, n, v in top))
