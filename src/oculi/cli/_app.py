"""The ``oculi`` group: lazy command loading and the one-line error policy.

Commands are imported when listed or invoked (from :data:`oculi.cli.COMMANDS`); none of them
imports torch at module level, so ``oculi --help`` answers in a fraction of a second.

Errors: a bad input (a usage error, any of oculi's errors, ``ValueError``, ``KeyError``,
``IndexError``, a missing or existing file) prints ``oculi: error: <one line>`` on stderr and
exits with status 2; anything else prints one line and exits with 1. With ``--json`` the
command also prints one JSON object on stdout, ``{"error": ..., "type": ..., "exit_code": ...}``,
so a script reading stdout always gets JSON. ``--debug`` (anywhere on the command line) or
``OCULI_DEBUG=1`` lets the exception and its traceback through instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

# exceptions that mean "the input was wrong": exit status 2, like click's usage errors
BAD_INPUT: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    FileExistsError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ImportError,
    NotImplementedError,
)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, click.ClickException):
        text = exc.format_message()
    elif isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__ and exc.args:
        text = str(exc.args[0])  # KeyError's str() quotes the message
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())


def _bad_input(exc: BaseException) -> bool:
    from oculi.errors import OculiError  # light: no torch

    return isinstance(exc, (click.ClickException, OculiError, *BAD_INPUT))


class OculiGroup(click.Group):
    """A group that loads its commands lazily and reports errors in one line."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *(n for n in super().list_commands(ctx) if n not in self.lazy)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        module, _, attr = self.lazy[cmd_name].partition(":")
        return getattr(importlib.import_module(module), attr)

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            import difflib

            close = difflib.get_close_matches(args[0], self.lazy, n=1) if args else []
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise click.UsageError(
                f"{exc.format_message().rstrip('.')}{hint} (commands: {', '.join(self.lazy)})"
            ) from exc

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("OCULI_DEBUG", "") not in ("", "0")
        extra.pop("standalone_mode", None)
        try:
            rv = super().main(argv, prog_name or "oculi", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            click.echo("oculi: aborted", err=True)
            sys.exit(1)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except Exception as exc:
            if debug:
                raise
            bad = _bad_input(exc)
            hint = "" if bad else f" ({type(exc).__name__}; rerun with --debug for the traceback)"
            line, code = _one_line(exc), 2 if bad else 1
            click.echo(f"oculi: error: {line}{hint}", err=True)
            if "--json" in argv:  # the caller parses stdout: one JSON object, also on failure
                import json

                error = {"error": line, "type": type(exc).__name__, "exit_code": code}
                click.echo(json.dumps(error, ensure_ascii=False))
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _version() -> str:
    from oculi import __version__

    return __version__


@click.group(
    cls=OculiGroup,
    lazy={},
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(_version(), "--version", prog_name="oculi")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def cli(debug: bool) -> None:
    """oculi: look inside Hugging Face decoder language models.

    \b
    Examples:
      oculi info
      oculi lens "The Eiffel Tower is located in the city of" --target " Paris"
      oculi trace "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" --target " Paris"
      oculi run logit_lens --config configs/logit_lens.yaml --tag first

    Every command takes --model (default: the embedded Gemma 3 270M), --device and --dtype.
    Run `oculi COMMAND --help` for a command's options and an example.

    ::

        oculi lens "The Eiffel Tower is located in the city of" --target " Paris" --json
    """


def main() -> None:
    """Entry point of the ``oculi`` console script and ``python -m oculi``.

    ::

        sys.argv = ["oculi", "verify", "--prompt", "Hello there"]
        main()                         # what the shell's `oculi verify --prompt ...` runs
    """
    cli.main()
