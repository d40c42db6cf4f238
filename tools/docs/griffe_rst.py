"""A griffe extension (``extensions:`` of the mkdocstrings handler in ``mkdocs.yml``): oculi's
docstrings use two pieces of reStructuredText that Markdown does not know, and this turns them
into what the site renders, in the loaded docstrings only (the source is not changed).

- Literal blocks, ``Example::`` followed by an indented block, become a sentence ending with
  ``:`` and a fenced block: Python (highlighted) when it parses as Python, else plain text.
- Cross-reference roles, ``:class:`~oculi.capture.LogitCapture``` (also ``:func:``, ``:meth:``,
  ``:mod:``, ``:attr:``, ``:data:``, ``:exc:``, ``:obj:``), become links to the API entry,
  resolved like Sphinx does: the full path, else relative to the object's class and module,
  else any public object of that name. ``~`` shows the last component. A name that resolves
  to nothing documented stays code (an optional reference never breaks the strict build).
"""

from __future__ import annotations

import ast
import re
from typing import Any

import griffe

ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<target>[^`<>]+?)(?:\s*<(?P<explicit>[^`>]+)>)?`"
)
SECTIONS = {"example", "examples", "note", "notes", "usage"}


def _literal_blocks(text: str) -> str:
    """``...::`` + an indented block -> ``...:`` + a fenced block (python or text)."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if not stripped.endswith("::"):
            out.append(line)
            i += 1
            continue
        base = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block_start = j
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > base
        ):
            j += 1
        while j > block_start and not lines[j - 1].strip():
            j -= 1
        block = lines[block_start:j]
        if not block:
            out.append(line)
            i += 1
            continue
        lead = stripped[:-2].rstrip()
        pad = " " * base
        if lead.strip():
            # "Example::" must not become a Google "Example:" section: emphasise it instead
            section = lead.strip().lower() in SECTIONS
            out += [f"{pad}*{lead.strip()}:*" if section else lead + ":", ""]
        indent = min(len(b) - len(b.lstrip()) for b in block if b.strip())
        code = [b[indent:] if b.strip() else "" for b in block]
        out.append(f"{pad}```{_language(code)}")
        out += [pad + b if b else "" for b in code]
        out.append(f"{pad}```")
        i = j
    return "\n".join(out)


def _language(code: list[str]) -> str:
    """``python`` for a block that parses as Python, else ``text`` (a diagram, a formula, a
    folder layout), so only code is highlighted as code."""
    try:
        ast.parse("\n".join(code))
    except SyntaxError:
        return "text"
    return "python"


def _lookup(obj: Any, target: str) -> str | None:
    """The documented path ``target`` means from inside ``obj``, or None."""
    root = obj.package
    candidates = [target]
    scope = obj
    while scope is not None:  # relative to the object, its class, its module, its package
        candidates.append(f"{scope.path}.{target}")
        scope = scope.parent
    for path in candidates:
        found = _get(root, path)
        if found is not None:
            return path
    return None


def _get(root: Any, path: str) -> Any:
    if not path.startswith(root.path + ".") and path != root.path:
        return None
    try:
        return root.get_member(path[len(root.path) + 1 :]) if path != root.path else root
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _roles(text: str, obj: Any) -> str:
    def link(match: re.Match[str]) -> str:
        target = (match["explicit"] or match["target"]).strip().rstrip("()")
        title = match["target"].strip() if match["explicit"] else target
        if match["tilde"]:
            title = title.rsplit(".", 1)[-1]
        path = _lookup(obj, target.lstrip("."))
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

    return ROLE.sub(link, text)


class ReStructuredText(griffe.Extension):
    """Rewrites every docstring of the loaded package once it is fully loaded."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: Any, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            value = _literal_blocks(obj.docstring.value)
            obj.docstring.value = _roles(value, obj)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)
