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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

DEFAULT_MODEL = "gemma-3-270m"
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
#: seeds: what torch.manual_seed accepts, so a huge seed is refused before the model loads
SEED = click.IntRange(0, 2**64 - 1)
#: positions: 64-bit integers here, then checked against the prompt by :func:`check_position`
POSITION = click.IntRange(-(2**63), 2**63 - 1)


class FiniteFloat(click.ParamType):
    """A float that is neither ``nan`` nor ``inf`` (click's ``float`` and ``FloatRange`` accept
    both), within optional bounds: ``FiniteFloat(min=0, min_open=True)`` for a tolerance,
    ``FiniteFloat(min=0, max=1, max_open=True)`` for a fraction."""

    name = "number"

    def __init__(
        self,
        min: float | None = None,
        max: float | None = None,
        *,
        min_open: bool = False,
        max_open: bool = False,
    ) -> None:
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        low = self.min is not None and (number < self.min or (self.min_open and number == self.min))
        high = self.max is not None and (
            number > self.max or (self.max_open and number == self.max)
        )
        if low or high:
            self.fail(f"{value!r} is out of range: it must be {self._range()}", param, ctx)
        return number

    def _range(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_open else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"{'<' if self.max_open else '<='} {self.max:g}")
        return " and ".join(parts)


def check_position(position: int, n_tokens: int, option: str = "--position") -> int:
    """``position`` if it indexes a prompt of ``n_tokens`` tokens, else ``click.BadParameter``
    naming the valid range ``-n_tokens .. n_tokens - 1``."""
    if not -n_tokens <= position < n_tokens:
        raise click.BadParameter(
            f"{option} {position} is outside the prompt's {n_tokens} tokens: use "
            f"{-n_tokens} .. {n_tokens - 1} (-1 is the last token)"
        )
    return position


def check_output_file(path: str, option: str = "--output") -> None:
    """Refuse, before any computation, an output path that is a folder or whose folder is a
    file or read-only (the write itself is atomic; this only saves a wasted run)."""
    import os
    from pathlib import Path

    out = Path(path).expanduser()
    if out.is_dir():
        raise click.BadParameter(f"{option} {path!r} is a folder; give a file name inside it")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise click.BadParameter(f"{option} {path!r}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise click.BadParameter(f"{option} {path!r}: the folder {parent} is not writable")


def check_device_option(ctx: Any, param: Any, value: str | None) -> str | None:
    """``--device``, checked before the model loads: a device this torch cannot use is one
    line naming the ones it can (exit 2)."""
    if value is None:
        return None
    from oculi.utils import resolve_device

    try:
        resolve_device(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return value


def model_options(fn: Callable) -> Callable:
    """``--model``, ``--device``, ``--dtype``, ``--device-map``, ``--offload-folder`` and
    ``--debug``."""
    fn = click.option(
        "--debug", is_flag=True, hidden=True, help="Show the full traceback on errors."
    )(fn)
    fn = click.option(
        "--offload-folder",
        default=None,
        metavar="FOLDER",
        help="Where a --device-map's 'disk' entries keep their weights.",
    )(fn)
    fn = click.option(
        "--device-map",
        default=None,
        metavar="MAP",
        callback=check_device_map_option,
        help="Split the model across devices: 'auto', or a JSON object of module path -> "
        "device ('cpu', 'disk', 'cuda:1', ...) covering the model (accelerate's device_map; "
        "replaces --device).",
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
        callback=check_device_option,
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


def check_device_map_option(ctx: Any, param: Any, value: str | None) -> Any:
    """``--device-map``: ``auto``/``balanced``/``sequential`` or a JSON object of module
    path -> device, parsed before the model loads."""
    if value is None or value in ("auto", "balanced", "balanced_low_0", "sequential"):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not all(isinstance(k, str) for k in parsed):
        raise click.BadParameter(
            f"{value!r} is neither 'auto' nor a JSON object of module path -> device "
            '(e.g. \'{"model.embed_tokens": "cpu", "model.layers.0": "disk", ...}\')',
            ctx=ctx,
            param=param,
        )
    return parsed


def load_adapter(
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    device_map: Any = None,
    offload_folder: str | None = None,
    **_: Any,
) -> Any:
    """``oculi.load(model, device=, dtype=)`` (the options of :func:`model_options`; others
    such as ``debug`` are ignored), with ``device_map=``/``offload_folder=`` when given,
    quietly (see :func:`quiet_loading`)."""
    import oculi

    extra: dict[str, Any] = {}
    if device_map is not None:
        extra["device_map"] = device_map
    if offload_folder is not None:
        extra["offload_folder"] = offload_folder
    with quiet_loading():
        return oculi.load(model, device=device, dtype=dtype, **extra)


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Without transformers' per-tensor progress bar (it is quick, and stderr stays for the
    one-line error a bad input gets)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
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
