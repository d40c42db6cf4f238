"""``oculi sae``: train sparse autoencoders on a harvest store, evaluate and explain them."""

from __future__ import annotations

from typing import Any

import click

from oculi.cli._options import (
    SEED,
    FiniteFloat,
    check_device_option,
    emit_json,
    json_option,
    model_options,
)


@click.group()
def sae() -> None:
    """Sparse autoencoders: train on a harvest store, evaluate them spliced, explain latents.

    `evaluate` and `features` load the model with --model, --device and --dtype (default:
    Gemma 3 270M).

    \b
    Example:
      oculi sae train --store acts --site resid_post --layer 6 --d-sae 4096 --k 32 --out sae6
      oculi sae evaluate sae6/sae.safetensors --prompts held_out.jsonl
      oculi sae features sae6/sae.safetensors --store acts -o features.html
    """


@sae.command("train")
@click.option("--store", required=True, metavar="DIR", help="A harvest store (oculi harvest).")
@click.option("--site", required=True, help="The site the SAE reads, e.g. resid_post.")
@click.option("--layer", required=True, type=int, help="The layer it reads.")
@click.option("--out", required=True, metavar="DIR", help="Checkpoints and sae.safetensors "
              "(an existing folder; re-running the same command resumes).")  # fmt: skip
@click.option("--d-sae", required=True, type=click.IntRange(min=1), help="Number of latents.")
@click.option("--kind", type=click.Choice(["topk", "batchtopk", "relu", "jumprelu"]),
              default="topk", show_default=True)  # fmt: skip
@click.option(
    "--k", type=click.IntRange(min=1), default=None, help="Latents per token (topk, batchtopk)."
)
@click.option("--target-site", default=None, help="A transcoder's written site (e.g. mlp_out).")
@click.option(
    "--n-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens to train on (default: one pass).",
)
@click.option("--batch-rows", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option(
    "--lr",
    type=FiniteFloat(min=0, min_open=True),
    default=None,
    help="Adam learning rate (default by d_sae).",
)
@click.option(
    "--l1-coefficient", type=FiniteFloat(min=0), default=None, help="ReLU's sparsity penalty."
)
@click.option(
    "--l0-coefficient", type=FiniteFloat(min=0), default=None, help="JumpReLU's L0 penalty."
)
@click.option(
    "--resample-every",
    type=click.IntRange(min=0),
    default=None,
    help="ReLU: tokens between resamplings of dead latents (default an eighth of the run; "
    "0: never).",
)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens between checkpoints.",
)
@click.option("--split", default=None, help="Train on this split of the store (e.g. train).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--device", default=None, callback=check_device_option,
              help="cpu or cuda (default: cuda when present).")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
def train_command(
    store: str, site: str, layer: int, out: str, d_sae: int, kind: str, k: int | None,
    target_site: str | None, n_tokens: int | None, batch_rows: int, lr: float | None,
    l1_coefficient: float | None, l0_coefficient: float | None, resample_every: int | None,
    checkpoint_every: int | None,
    split: str | None, seed: int, device: str | None, quiet: bool, as_json: bool,
) -> None:  # fmt: skip
    """Train an SAE (or a transcoder with --target-site) on STORE's SITE at LAYER.

    \b
    Example:
      oculi harvest --prompts prompts.jsonl --sites resid_post --layers 6 --out acts
      oculi sae train --store acts --site resid_post --layer 6 --d-sae 4096 --k 32 --out sae6
    """
    from oculi.sae.train import train

    options: dict[str, Any] = {
        "target_site": target_site, "n_tokens": n_tokens, "batch_rows": batch_rows, "lr": lr,
        "checkpoint_every": checkpoint_every, "split": split, "seed": seed,
        "resample_every": resample_every,
    }  # fmt: skip
    if l1_coefficient is not None:
        options["l1_coefficient"] = l1_coefficient
    if l0_coefficient is not None:
        options["l0_coefficient"] = l0_coefficient
    result = train(store, site, layer, d_sae=d_sae, kind=kind, k=k, out=out, device=device,
                   progress=not quiet, **options)  # fmt: skip
    info = result.metadata["training"]
    final = info.get("final", {})
    if as_json:
        emit_json({"path": f"{out}/sae.safetensors", "steps": info["steps"],
                   "tokens": info["tokens"], "final": final})  # fmt: skip
        return
    click.echo(
        f"{out}/sae.safetensors: {kind} SAE, {d_sae} latents on {site} of layer {layer}; "
        f"{info['tokens']:,} tokens in {info['steps']} steps; last batch FVU "
        f"{final.get('fvu', float('nan')):.4f}, L0 {final.get('l0', float('nan')):.1f}, "
        f"dead {final.get('dead_pct', float('nan')):.1f}%"
    )


@sae.command("evaluate")
@click.argument("path")
@click.option("--prompts", required=True, metavar="FILE", help="JSONL of held-out prompts.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-length", type=click.IntRange(min=1), default=128, show_default=True)
@model_options
@json_option
def evaluate_command(
    path: str, prompts: str, text_field: str, batch_size: int, max_length: int, as_json: bool,
    **model_opts: Any,
) -> None:  # fmt: skip
    """FVU, L0, dead % and CE loss recovered of the SAE at PATH, spliced into the model.

    \b
    Example:
      oculi sae evaluate sae6/sae.safetensors --prompts held_out.jsonl --json
    """
    from dataclasses import asdict

    from oculi.cli._options import load_adapter
    from oculi.harvest.prompts import read_prompts
    from oculi.sae import evaluate, load_sae

    adapter = load_adapter(**model_opts)
    texts = read_prompts(prompts, text_field=text_field)
    result = evaluate(adapter, load_sae(path, device=adapter.device), texts,
                      batch_size=batch_size, max_length=max_length)  # fmt: skip
    if as_json:
        emit_json(asdict(result))
        return
    click.echo(result.table())


@sae.command("features")
@click.argument("path")
@click.option("--store", required=True, metavar="DIR", help="A harvest store holding its site.")
@click.option("--out", "-o", required=True, metavar="FILE", help="The .html page to write.")
@click.option("--latents", default=None, help="Comma-separated latents (default: 24 that fire).")
@click.option(
    "--k",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Top examples per latent.",
)
@click.option(
    "--contexts", type=click.IntRange(min=1), default=8, show_default=True, help="Examples shown."
)
@model_options
@json_option
def features_command(
    path: str, store: str, out: str, latents: str | None, k: int, contexts: int, as_json: bool,
    **model_opts: Any,
) -> None:  # fmt: skip
    """Write an offline page explaining latents of the SAE at PATH over a harvest store.

    One pass over the store finds every latent's top-activating tokens, density and histogram;
    the page shows them with the tokens each latent's decoder direction promotes and
    suppresses.

    \b
    Example:
      oculi sae features sae6/sae.safetensors --store acts -o features.html --latents 3,12,40
    """
    from oculi.cli._options import check_output_file, load_adapter
    from oculi.harvest.store import open_harvest
    from oculi.sae import load_sae, top_activations
    from oculi.visualize.features import write_feature_page

    check_output_file(out, "--out")  # a folder or an unwritable place: refused before the pass
    chosen = None
    if latents:
        try:
            chosen = [int(x) for x in latents.split(",")]
        except ValueError:
            raise click.BadParameter(
                f"{latents!r}: give latent indices like '3,12,40'", param_hint="--latents"
            ) from None
    adapter = load_adapter(**model_opts)
    model = load_sae(path, device=adapter.device)
    for i in chosen or []:
        if not 0 <= i < model.d_sae:
            raise click.BadParameter(
                f"latent {i} out of range for d_sae={model.d_sae} (0..{model.d_sae - 1})",
                param_hint="--latents",
            )
    feats = top_activations(open_harvest(store), model, k=k)
    written = write_feature_page(feats, adapter, out, chosen, n_contexts=contexts)
    alive = int((feats.counts > 0).sum())
    if as_json:
        emit_json({"path": str(written), "tokens": feats.n_tokens, "latents_alive": alive,
                   "d_sae": model.d_sae})  # fmt: skip
        return
    click.echo(
        f"wrote {written}: {alive:,} of {model.d_sae:,} latents fired on {feats.n_tokens:,} tokens"
    )
