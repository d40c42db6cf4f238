"""docs/guides/cli.md cannot drift from the ``oculi`` command group.

The page's executed block prints the command list from :data:`oculi.cli.COMMANDS` (checked by
tests/test_docs_examples.py); this test checks the rest against the click commands themselves:
every command and subcommand has its line in the page's "Every option" list, and every option
and argument of every command is named on the page.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from oculi.cli import COMMANDS, cli

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "cli.md"


def _commands() -> list[tuple[str, click.Command]]:
    """``(path, command)`` for every command and subcommand of ``oculi``."""
    out = []
    with click.Context(cli) as ctx:
        for name in COMMANDS:
            command = cli.get_command(ctx, name)
            assert command is not None, name
            subs = getattr(command, "commands", {})
            out += [(f"{name} {s}", sub) for s, sub in subs.items()] or [(name, command)]
    return out


def _every_option_section() -> str:
    return PAGE.read_text().split("## Every option", 1)[1]


def test_every_command_has_its_line_on_the_page():
    lines = [ln for ln in _every_option_section().splitlines() if ln.startswith("- `")]
    listed = [re.match(r"- `([a-z]+(?: [a-z]+)?)", ln).group(1) for ln in lines]  # type: ignore[union-attr]
    assert sorted(listed) == sorted(path for path, _ in _commands())


def test_every_option_of_every_command_is_named_on_the_page():
    page = PAGE.read_text()
    missing = []
    for path, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option):
                names = [o for o in param.opts + param.secondary_opts if o.startswith("--")]
                if names and not any(f"`{n}" in page or f"/{n}" in page for n in names):
                    missing.append(f"oculi {path} {names[0]}")
            elif isinstance(param, click.Argument) and param.human_readable_name not in page:
                missing.append(f"oculi {path} {param.human_readable_name}")
    assert not missing, f"options not on {PAGE.name}: {missing}"


def test_the_page_names_no_option_that_does_not_exist():
    known = {
        o
        for _, command in _commands()
        for param in command.params
        for o in getattr(param, "opts", []) + getattr(param, "secondary_opts", [])
    } | {"--help", "--version", "--debug"}
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", _every_option_section()))
    assert named <= known, f"not options of any command: {sorted(named - known)}"
