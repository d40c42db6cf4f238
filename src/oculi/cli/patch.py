"""``oculi patch`` and ``oculi trace``: activation patching and causal tracing."""

from __future__ import annotations

import math
from typing import Any

import click

from oculi.cli._options import SEED, emit_json, json_option, load_adapter, model_options

SITES = (
    "resid_pre", "attn_in", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_in",
    "mlp_gate", "mlp_up", "mlp_post", "mlp_out", "resid_post",
)  # fmt: skip


@click.command()
@click.option("--clean", required=True, help="The prompt whose activations are patched in.")
@click.option("--corrupt", required=True, help="The prompt run with patches (same token length).")
@click.option("--answer", required=True, help="The clean answer token (e.g. ' Mary').")
@click.option("--wrong", required=True, help="The corrupt answer token (e.g. ' John').")
@click.option(
    "--site",
    type=click.Choice(SITES),
    default="resid_pre",
    show_default=True,
    help="The activation patched.",
)
@click.option(
    "--per-head", is_flag=True, help="Sweep heads instead of positions (sites z, q, k, v, pattern)."
)
@click.option("--layers", default=None, metavar="0,1,2", help="Layers swept (default all).")
@model_options
@json_option
def patch(
    clean: str,
    corrupt: str,
    answer: str,
    wrong: str,
    site: str,
    per_head: bool,
    layers: str | None,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Activation patching: clean activations into the corrupt run, one layer x position (or
    head) at a time; prints the recovery of the logit difference answer - wrong.

    \b
    Example:
      oculi patch --clean "When Mary and John went to the store, John gave a drink to" \\
                  --corrupt "When Mary and John went to the store, Mary gave a drink to" \\
                  --answer " Mary" --wrong " John" --site z --per-head
    """
    from oculi import patching

    layer_list = _int_list(layers, "--layers")
    adapter = load_adapter(**model_opts)
    res = patching.activation_patching(
        adapter,
        clean,
        corrupt,
        site=site,
        metric=patching.logit_diff(answer, wrong),
        layers=layer_list,
        per_head=per_head,
    )
    try:
        normalized = res.normalized()
    except ValueError:
        normalized = None
    if as_json:
        emit_json(
            {
                "clean": clean,
                "corrupt": corrupt,
                "site": res.site,
                "axis": res.axis,
                "layers": res.layers,
                "tokens": res.tokens,
                "values": res.values,
                "normalized": normalized,
                "clean_metric": res.clean_metric,
                "corrupt_metric": res.corrupt_metric,
            }
        )
        return
    click.echo(
        f"logit diff {answer!r} - {wrong!r}: clean {res.clean_metric:.3f}, "
        f"corrupt {res.corrupt_metric:.3f}"
    )
    click.echo(f"{'recovery' if normalized is not None else 'metric'} by layer x {res.axis}:")
    click.echo(res.table(normalized=normalized is not None))


def _int_list(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} {text!r} is not a comma-separated list of ints") from None


@click.command()
@click.argument("prompt")
@click.option("--subject", required=True, help="The substring of PROMPT to corrupt.")
@click.option("--target", required=True, help="The answer token (e.g. ' Paris').")
@click.option(
    "--kind",
    type=click.Choice(["resid", "mlp", "attn"]),
    default="resid",
    show_default=True,
    help="Which state is restored.",
)
@click.option(
    "--window",
    type=click.IntRange(min=1),
    default=None,
    help="Layers restored at once (default 1 for resid, 10 otherwise).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Noise samples averaged.",
)
@click.option(
    "--noise",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    callback=lambda _ctx, _param, value: _finite(value),
    help="Noise scale, in embedding standard deviations (finite, > 0).",
)
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the noise.")
@model_options
@json_option
def trace(
    prompt: str,
    subject: str,
    target: str,
    kind: str,
    window: int | None,
    samples: int,
    noise: float,
    seed: int,
    as_json: bool,
    **model_opts: Any,
) -> None:
    """Causal tracing (ROME): noise the subject, restore each clean state, read p(target).

    \b
    Example:
      oculi trace "The Eiffel Tower is located in the city of" \\
                  --subject "The Eiffel Tower" --target " Paris" --kind mlp
    """
    from oculi.patching import causal_tracing

    adapter = load_adapter(**model_opts)
    res = causal_tracing(
        adapter,
        prompt,
        subject,
        target,
        kind=kind,  # type: ignore[arg-type]  # click.Choice checked it
        window=window,
        samples=samples,
        noise=noise,
        seed=seed,
    )  # type: ignore[arg-type]
    if as_json:
        emit_json(
            {
                "prompt": prompt,
                "subject": subject,
                "target": target,
                "kind": res.kind,
                "window": res.window,
                "tokens": res.tokens,
                "subject_positions": res.subject_positions,
                "values": res.values,
                "clean_prob": res.clean_prob,
                "corrupt_prob": res.corrupt_prob,
            }
        )
        return
    click.echo(f"p({target!r}): clean {res.clean_prob:.4f}, corrupted {res.corrupt_prob:.4f}")
    click.echo(res.table())


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"must be a finite number > 0, got {value}")
    return value
