"""``oculi harvest``: activations of every token of a prompt set, into a resumable store."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from oculi.cli._options import SEED, FiniteFloat, emit_json, json_option, model_options


def parse_layers(spec: str) -> list[int] | None:
    """``"0-17"``, ``"0,3,5"``, ``"0-5,9"``, ``"-1"`` or ``"all"`` -> layer indices (None: all).

    Raises:
        click.BadParameter: a part that is not an int or an ``a-b`` range with ``a <= b``.
    """
    if spec.strip() == "all":
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-") if not part.startswith("-") else (part, "", "")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise click.BadParameter(
                f"bad layer spec {part!r} in {spec!r}: use ints and ranges like '0-17', "
                "'0,3,5', '0-5,9', or 'all'",
                param_hint="--layers",
            ) from None
    return out


@click.command()
@click.option(
    "--prompts",
    required=True,
    metavar="FILE",
    help="JSONL file: one JSON string, or object with --text-field, a line.",
)
@click.option("--sites", required=True, help="Comma-separated sites, e.g. resid_post,mlp_out.")
@click.option("--layers", required=True, help="'0-17', '0,3,5', '0-5,9' or 'all'.")
@click.option(
    "--out", required=True, metavar="DIR", help="The store folder (resumed if it exists)."
)
@click.option(
    "--text-field", default="text", show_default=True, help="The text's key in JSONL objects."
)
@click.option(
    "--batch-tokens",
    type=click.IntRange(min=1),
    default=8192,
    show_default=True,
    help="Token budget per forward.",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    default=None,
    help="Keep the first N tokens of each prompt.",
)
@click.option(
    "--storage-dtype",
    type=click.Choice(["float32", "float16"]),
    default=None,
    help="Stored dtype (default: the model's; float32 for bf16 models).",
)
@click.option("--compression", type=click.Choice(["zstd"]), default=None, help="Compress chunks.")
@click.option(
    "--split",
    type=FiniteFloat(0, 1, max_open=True),
    default=0.0,
    show_default=True,
    help="Fraction of prompts held out as 'test' in the index.",
)
@click.option(
    "--seed", type=SEED, default=0, show_default=True, help="Seed of the held-out choice."
)
@click.option(
    "--no-resume",
    is_flag=True,
    help="Replace the oculi store at --out (never a folder oculi did not create).",
)
@click.option("--verify", is_flag=True, help="On resume, re-read committed units and check them.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster to join (e.g. auto).")
@click.option(
    "--concurrency", type=click.IntRange(min=1), default=1, show_default=True, help="Ray actors."
)
@click.option(
    "--num-gpus", type=FiniteFloat(min=0), default=0, show_default=True, help="GPUs per Ray actor."
)
@click.option(
    "--num-cpus",
    type=FiniteFloat(min=0, min_open=True),
    default=1,
    show_default=True,
    help="CPUs per Ray actor.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@model_options
@json_option
def harvest(
    prompts: str, sites: str, layers: str, out: str, text_field: str, batch_tokens: int,
    max_length: int | None, storage_dtype: str | None, compression: str | None, split: float,
    seed: int, no_resume: bool, verify: bool, executor: str, address: str | None,
    concurrency: int, num_gpus: float, num_cpus: float, quiet: bool, as_json: bool,
    **model_opts: Any,
) -> None:  # fmt: skip
    """Record SITES x LAYERS for every token of a prompt set into a zarr + Parquet store.

    Re-running the same command resumes: only units not yet committed are computed; a
    second harvest into a store being written is refused (the store is locked). With
    --executor ray the units run on a Ray cluster, one model per actor (the store folder
    must be visible to every node).

    \b
    Example:
      oculi harvest --prompts prompts.jsonl --sites resid_post --layers 0-17 --out acts
      oculi harvest --prompts prompts.jsonl --sites resid_post --layers 0-17 --out acts \\
          --executor ray --address auto --concurrency 8 --num-gpus 1
    """
    import torch

    import oculi
    from oculi.cli._options import load_adapter
    from oculi.harvest import RayExecutor

    wanted = parse_layers(layers)
    runner: Any = "local"
    if executor == "ray":
        runner = RayExecutor(model=model_opts["model"], address=address, concurrency=concurrency,
                             num_gpus=num_gpus, num_cpus=num_cpus, device=model_opts["device"],
                             dtype=model_opts["dtype"])  # fmt: skip
    adapter = load_adapter(**model_opts)
    summary = oculi.harvest(
        adapter, prompts, sites=[s.strip() for s in sites.split(",")], layers=wanted, out=out,
        executor=runner, batch_tokens=batch_tokens, max_length=max_length,
        storage_dtype={"float32": torch.float32, "float16": torch.float16}.get(storage_dtype or ""),
        resume=not no_resume, verify=verify, split=split, seed=seed, compression=compression,
        text_field=text_field, progress=not quiet,
    )  # fmt: skip
    if as_json:
        emit_json(asdict(summary))
        return
    click.echo(
        f"{summary.path}: {summary.tokens} tokens of {summary.n_prompts} prompts, "
        f"{len(summary.rows)} arrays, {summary.bytes / 2**20:.1f} MB; computed "
        f"{summary.units_computed} of {summary.units} units in {summary.seconds:.1f} s "
        f"({summary.tokens_per_s:,.0f} tokens/s)"
    )
