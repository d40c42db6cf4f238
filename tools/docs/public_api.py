"""oculi's public API as the documentation sees it: which modules get a reference page and
which names each page lists.

A module gets a page when it is public (no ``_`` in its dotted path), defines ``__all__``, and
is either a package (``oculi``, ``oculi.analysis``, ...), a direct child of ``oculi``
(``oculi.probe``), or exports a name its parent package does not re-export
(``oculi.analysis.dla``). Everything is read from the live modules, so a new public name or a
new subpackage is on the site at the next build without anyone editing a list; the reference
generator (``tools/docs/gen_reference.py``) and ``tests/test_docs_site.py`` both use this.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass


@dataclass(frozen=True)
class ReferencePage:
    """One API page: ``module`` (dotted name), ``names`` (its ``__all__``, in order) and
    ``path`` (the page inside ``docs/``, e.g. ``reference/oculi/analysis.md``)."""

    module: str
    names: tuple[str, ...]

    @property
    def path(self) -> str:
        parts = self.module.split(".")
        return "reference/" + "/".join(parts) + ".md"


def _public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def reference_pages(root: str = "oculi") -> list[ReferencePage]:
    """Every reference page, ``root`` first, then the others sorted by dotted name."""
    package = importlib.import_module(root)
    names = [root] + sorted(
        info.name
        for info in pkgutil.walk_packages(package.__path__, root + ".")
        if _public(info.name)
    )
    pages = []
    for name in names:
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            continue
        parent_name = name.rpartition(".")[0]
        keep = hasattr(module, "__path__") or parent_name == root or name == root
        if not keep:
            parent = importlib.import_module(parent_name)
            keep = bool(set(exported) - set(getattr(parent, "__all__", ())))
        if keep:
            pages.append(ReferencePage(name, tuple(exported)))
    return pages
