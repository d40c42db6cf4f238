"""``oculi run``: a registered experiment from a YAML config, into a run folder."""

from __future__ import annotations

import click

from oculi.cli._options import (
    DTYPES,
    check_device_option,
    emit_json,
    json_option,
    quiet_loading,
)

# shown in --help without importing the experiments (kept equal to the registry by a test)
EXPERIMENT_NAMES = (
    "logit_lens", "causal_tracing", "activation_patching", "path_patching", "head_detection",
    "steering", "attribution", "circuit", "circuit_discovery",
)  # fmt: skip


@click.command(
    help=f"""Run EXPERIMENT with the keys of a YAML config; write outputs/EXPERIMENT/TAG/.

    The run folder holds result.json (numbers, resolved config, provenance: versions, model
    hash, device, dtype, seed, git SHA, times, parity check), config.yaml and figures (PNG and
    SVG). An existing run is never replaced unless --overwrite.

    EXPERIMENT is one of: {", ".join(EXPERIMENT_NAMES)}.

    \b
    Example:
      oculi run causal_tracing --config configs/causal_tracing.yaml --tag eiffel
    """
)
@click.argument("experiment")
@click.option(
    "--config",
    "-c",
    "config",
    required=True,
    metavar="CFG.YAML",
    help="The experiment's YAML config.",
)
@click.option(
    "--tag", default=None, help="Run folder name (default: the config's tag, or 'default')."
)
@click.option(
    "--out", "out_dir", default="outputs", show_default=True, metavar="DIR", help="Outputs root."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--no-parity", is_flag=True, help="Skip the parity check on the run's prompt.")
@click.option(
    "--model",
    "-m",
    default=None,
    metavar="NAME_OR_PATH",
    help="Override the config's model (default: the config's, else gemma-3-270m).",
)
@click.option(
    "--device",
    default=None,
    metavar="DEVICE",
    callback=check_device_option,
    help="Override the config's device.",
)
@click.option(
    "--dtype", type=click.Choice(DTYPES), default=None, help="Override the config's dtype."
)
@click.option("--debug", is_flag=True, hidden=True)
@json_option
def run(
    experiment: str,
    config: str,
    tag: str | None,
    out_dir: str,
    overwrite: bool,
    no_parity: bool,
    model: str | None,
    device: str | None,
    dtype: str | None,
    debug: bool,
    as_json: bool,
) -> None:
    from oculi.experiments import run_experiment

    with quiet_loading():
        done = run_experiment(
            experiment,
            config,
            model=model,
            device=device,
            dtype=dtype,
            tag=tag,
            out_dir=out_dir,
            overwrite=overwrite,
            parity=not no_parity,
        )
    if as_json:
        emit_json({"folder": str(done.folder), **done.result})
        return
    prov = done.result["provenance"]
    parity = prov.get("parity")
    click.echo(f"wrote {done.folder}/ ({', '.join(done.result['files'])})")
    click.echo(
        f"model {prov['model']['id']} on {prov['device']} ({prov['dtype']}), seed "
        f"{prov['seed']}, {prov['duration_s']:.2f} s"
    )
    if parity is not None:
        click.echo(
            f"parity check: {'ok' if parity['ok'] else 'MISMATCH'} ({len(parity['checks'])} checks)"
        )
