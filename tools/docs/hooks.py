"""MkDocs hooks (``hooks:`` in ``mkdocs.yml``): tables computed from the code at build time.

A page that contains ``<!-- oculi:site-map -->`` gets the table of where each site kind lives
in each family, and ``<!-- oculi:families -->`` the table of registered families
(``tools/docs/site_map.py``); a marker the build does not know is an error.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from site_map import families_table, site_map_table  # noqa: E402

TABLES = {"site-map": site_map_table, "families": families_table}
MARKER = re.compile(r"<!-- oculi:([a-z-]+) -->")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    def table(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(
                f"{page.file.src_path}: unknown table marker {match.group(0)!r}; "
                f"known: {sorted(TABLES)}"
            )
        return TABLES[name]()

    return MARKER.sub(table, markdown)
