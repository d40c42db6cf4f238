"""Writes the API reference pages at build time (run by mkdocs-gen-files, see ``mkdocs.yml``).

An overview (``reference/index.md``: each module with the first paragraph of its docstring),
one page per module listed by :func:`public_api.reference_pages`, and
``reference/SUMMARY.md``, the navigation that mkdocs-literate-nav turns into the "API
reference" section. Each page renders the names in the module's ``__all__`` with mkdocstrings
(anchor ``module.name``); a name that is a module itself (``oculi.sae``) gets a heading with that
anchor and a link to the module's own page, and a name that the static reader would confuse with
a submodule of the same name (the function ``oculi.harvest`` beside the package
``oculi.harvest``) gets a heading and a cross-reference to where it is defined.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).parent))
from public_api import ReferencePage, reference_pages  # noqa: E402


def _relative(src: str, dst: str) -> str:
    """The link from page ``src`` to page ``dst`` (both paths inside docs/)."""
    up = src.count("/")
    return "../" * up + dst


def _shadowed(module: object, page: ReferencePage, name: str) -> bool:
    """True when ``page.module.name`` is also a submodule's dotted name."""
    return (
        hasattr(module, "__path__")
        and importlib.util.find_spec(f"{page.module}.{name}") is not None
    )


def _rendered_at(pages: list[ReferencePage]) -> dict[int, str]:
    """id(object) -> the anchor of the first page that renders it in full."""
    found: dict[int, str] = {}
    for page in pages:
        module = importlib.import_module(page.module)
        for name in page.names:
            value = getattr(module, name)
            if not inspect.ismodule(value) and not _shadowed(module, page, name):
                found.setdefault(id(value), f"{page.module}.{name}")
    return found


def _page_text(
    page: ReferencePage, by_module: dict[str, ReferencePage], rendered_at: dict[int, str]
) -> str:
    module = importlib.import_module(page.module)
    plain, extra = [], []
    for name in page.names:
        value = getattr(module, name)
        anchor = f"{page.module}.{name}"
        if inspect.ismodule(value):
            target = by_module.get(value.__name__)
            link = (
                f"[`{value.__name__}`]({_relative(page.path, target.path)})"
                if target
                else f"`{value.__name__}`"
            )
            summary = (inspect.getdoc(value) or "").split("\n\n")[0].replace("\n", " ")
            extra.append(f"## `{name}` {{#{anchor}}}\n\nThe module {link}: {summary}\n")
        elif _shadowed(module, page, name):
            where = rendered_at.get(id(value))
            if where is not None:
                summary = (inspect.getdoc(value) or "").split("\n\n")[0].replace("\n", " ")
                extra.append(
                    f"## `{name}` {{#{anchor}}}\n\n"
                    f"[`{where}`][{where}], re-exported here: {summary}\n"
                )
            else:  # documented nowhere else: in full here, under its defining module's path
                where = f"{value.__module__}.{value.__qualname__}"
                extra.append(
                    f"## `{name}` {{#{anchor}}}\n\n::: {where}\n"
                    "    options:\n      show_root_heading: false\n"
                    "      show_root_toc_entry: false\n"
                )
        else:
            plain.append(name)
    text = f"# `{page.module}`\n\n::: {page.module}\n"
    text += "    options:\n      show_root_heading: false\n      show_root_toc_entry: false\n"
    if plain:
        text += "      members:\n" + "".join(f"        - {name}\n" for name in plain)
    else:
        text += "      members: false\n"
    return text + "\n" + "\n".join(extra)


pages = reference_pages()
by_module = {page.module: page for page in pages}
rendered_at = _rendered_at(pages)
summary = ["* [Overview](index.md)"]
overview = [
    "# API reference",
    "",
    "Every public name of oculi, generated from the docstrings when the site is built: one page",
    "per module that exports names (its ``__all__``), with signatures, parameters, shapes and",
    "examples. Most work starts from the top-level names on [`oculi`](oculi.md).",
    "",
    "| module | what it holds | names |",
    "| --- | --- | ---: |",
]
for page in pages:
    doc = inspect.getdoc(importlib.import_module(page.module)) or ""
    first = " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")
    link = page.path.removeprefix("reference/")
    overview.append(f"| [`{page.module}`]({link}) | {first} | {len(page.names)} |")
with mkdocs_gen_files.open("reference/index.md", "w") as f:
    f.write("\n".join(overview) + "\n")
mkdocs_gen_files.set_edit_path("reference/index.md", "tools/docs/gen_reference.py")

for page in pages:
    summary.append(f"* [{page.module}]({page.path.removeprefix('reference/')})")
    with mkdocs_gen_files.open(page.path, "w") as f:
        f.write(_page_text(page, by_module, rendered_at))
    mkdocs_gen_files.set_edit_path(page.path, "tools/docs/gen_reference.py")

with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as f:
    f.write("\n".join(summary) + "\n")
