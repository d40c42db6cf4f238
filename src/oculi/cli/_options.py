"""Options and helpers shared by the commands (light: only click at import time).

::

    @click.command()
    @click.argument("prompt")
    @model_options
    @json_option
    def lens(prompt, model, device, dtype, as_json): ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

DEFAULT_MODEL = "gemma-3-270m"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def model_options(fn: Callable) -> Callable:
    """``--model``, ``--device``, ``--dtype`` and ``--debug``."""
    fn = click.option(
        "--debug", is_flag=True, hidden=True, help="Show the full traceback on errors."
    )(fn)
    fn = click.option(
        "--dtype",
        type=click.Choice(DTYPES),
        default=None,
        help="Weights dtype (default: the checkpoint's own; fp32 for the default model).",
    )(fn)
    fn = click.option(
        "--device",
        default=None,
        metavar="DEVICE",
        help="cpu, cuda, cuda:1, mps (default: cuda, then mps, then cpu).",
    )(fn)
    return click.option(
        "--model",
        "-m",
        default=DEFAULT_MODEL,
        show_default=True,
        metavar="NAME_OR_PATH",
        help="The embedded default, a local folder, a .gguf file or a Hugging Face Hub id.",
    )(fn)


def json_option(fn: Callable) -> Callable:
    """``--json``: print one JSON document on stdout instead of tables."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout."
    )(fn)


def load_adapter(
    model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None, **_: Any
) -> Any:
    """``oculi.load(model, device=, dtype=)`` (the options of :func:`model_options`; others
    such as ``debug`` are ignored) without transformers' per-tensor progress bar (it is quick, and stderr
    stays for the one-line error a bad input gets)."""
    from transformers.utils import logging as hf_logging

    import oculi

    hf_logging.disable_progress_bar()
    try:
        return oculi.load(model, device=device, dtype=dtype)
    finally:
        hf_logging.enable_progress_bar()


def emit_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (tensors and NaN turned into plain numbers / null)."""
    from oculi.experiments.serialize import to_jsonable

    click.echo(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False))


def parse_head(text: str, what: str = "head") -> tuple[int, int]:
    """``"3.1"`` -> ``(3, 1)``; a clear ``click.BadParameter`` otherwise."""
    layer, dot, head = text.partition(".")
    try:
        if not dot:
            raise ValueError
        return int(layer), int(head)
    except ValueError:
        raise click.BadParameter(
            f"{what} {text!r} is not LAYER.HEAD (e.g. 3.1 for layer 3, head 1)"
        ) from None


def parse_scaled_head(text: str) -> tuple[int, int, float]:
    """``"5.2=1.5"`` -> ``(5, 2, 1.5)``."""
    head, eq, alpha = text.partition("=")
    if not eq:
        raise click.BadParameter(f"--scale {text!r} is not LAYER.HEAD=ALPHA (e.g. 5.2=1.5)")
    layer, h = parse_head(head, "--scale head")
    try:
        return layer, h, float(alpha)
    except ValueError:
        raise click.BadParameter(f"--scale {text!r}: alpha {alpha!r} is not a number") from None


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
