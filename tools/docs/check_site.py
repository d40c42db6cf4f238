"""Opens the built documentation site from disk in headless Chromium with the network off and
checks what a reader sees first (``make docs-check``; ``tests/test_docs_site.py`` runs it too).

The pages, each found in the built folder: the landing page (``index.html``), a guide
(``guides/*.html``), an API page (``reference/oculi.html``) and every tutorial rendered from a
notebook (``tutorials/*.html`` and ``tutorial.html``; at least one). Each must load with no console error,
no uncaught exception and no request for anything but a local file; the search box, typed into
on the landing page, must list a result for ``activation_patching``. A screenshot of
each page (its first screen) goes to ``--png-dir``.

::

    python tools/docs/check_site.py site --png-dir outputs/docs-check
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SEARCH_TERM = "activation_patching"


@dataclass
class SiteCheck:
    """What the check saw: ``pages`` (kind -> the file opened), ``problems`` (one line each;
    empty when the site passed), ``search_hits`` (the titles search listed) and ``screenshots``."""

    pages: dict[str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    search_hits: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)


def pick_pages(site: Path) -> tuple[dict[str, Path], list[str]]:
    """The pages to open (kind -> file; ``tutorial`` is the first notebook, ``tutorial-<name>``
    the others) and a problem line for each kind not found."""
    candidates = {
        "landing": [site / "index.html"],
        "guide": sorted((site / "guides").glob("*.html")),
        "api": [site / "reference" / "oculi.html"],
        "tutorial": sorted((site / "tutorials").glob("*.html")) + [site / "tutorial.html"],
    }
    pages, missing = {}, []
    for kind, files in candidates.items():
        found = [f for f in files if f.is_file()]
        if not found:
            missing.append(f"no {kind} page in {site} (looked for {[str(f) for f in files]})")
        elif kind == "tutorial":  # every notebook: their outputs carry the views' scripts
            pages[kind] = found[0]
            pages.update({f"tutorial-{f.stem}": f for f in found[1:]})
        else:
            pages[kind] = found[0]
    return pages, missing


def check_site(
    site: str | Path, png_dir: str | Path | None = None, *, search_timeout_ms: int = 15_000
) -> SiteCheck:
    """Open the site at ``site`` (the built folder) and return what was seen; search results
    are awaited up to ``search_timeout_ms``."""
    from oculi.visualize.browser import offline_page

    site = Path(site).resolve()
    result = SiteCheck()
    result.pages, result.problems = pick_pages(site)
    if png_dir is not None:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
    with offline_page() as page:
        for kind, file in result.pages.items():
            before = len(page.oculi_errors), len(page.oculi_requests)
            page.goto(file.as_uri())
            page.wait_for_load_state("load")
            if not page.locator("article h1, .md-content h1").count():
                result.problems.append(f"{kind} ({file.name}): no heading rendered")
            if png_dir is not None:
                png = Path(png_dir) / f"{kind}.png"
                page.screenshot(path=str(png))  # the first screen, as a reader sees it
                result.screenshots.append(png)
            errors = page.oculi_errors[before[0] :]
            requests = page.oculi_requests[before[1] :]
            result.problems += [f"{kind} ({file.name}): console: {e}" for e in errors]
            result.problems += [f"{kind} ({file.name}): network request: {u}" for u in requests]
        if "landing" in result.pages:
            before = len(page.oculi_errors), len(page.oculi_requests)
            page.goto(result.pages["landing"].as_uri())
            box = page.locator("input.md-search__input")
            box.click()
            box.press_sequentially(SEARCH_TERM)
            items = page.locator(".md-search-result__item")
            # playwright's TimeoutError when nothing shows: reported below as no hit
            with contextlib.suppress(Exception):
                items.first.wait_for(state="visible", timeout=search_timeout_ms)
            result.search_hits = [t.strip() for t in items.all_inner_texts()]
            if not any(SEARCH_TERM in hit for hit in result.search_hits):
                result.problems.append(f"search found nothing for {SEARCH_TERM!r}")
            if png_dir is not None:
                png = Path(png_dir) / "search.png"
                page.screenshot(path=str(png))
                result.screenshots.append(png)
            result.problems += [f"search: console: {e}" for e in page.oculi_errors[before[0] :]]
            result.problems += [
                f"search: network request: {u}" for u in page.oculi_requests[before[1] :]
            ]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="the built site folder (make docs writes site/)")
    parser.add_argument("--png-dir", type=Path, default=Path("outputs/docs-check"))
    args = parser.parse_args(argv)
    result = check_site(args.site, args.png_dir)
    for kind, file in result.pages.items():
        print(f"{kind}: {file}")
    print(f"search {SEARCH_TERM!r}: {len(result.search_hits)} results")
    for png in result.screenshots:
        print(f"screenshot: {png}")
    for problem in result.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if result.problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
