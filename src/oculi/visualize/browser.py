"""Open a report in headless Chromium with the network off: screenshots, and the check that
the page is self-contained (used by ``make report-demo`` and the test suite).

::

    python -m oculi.visualize.browser "The Eiffel Tower is located in the city of" \\
        --subject "The Eiffel Tower" --html outputs/report.html --png outputs/report.png

Needs Playwright's Python package (the ``dev`` extra) and a Chromium executable: the Debian
package (``apt-get install chromium``), found on ``PATH`` or given as ``$OCULI_CHROMIUM``;
browsers are never downloaded.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oculi.errors import MissingExtraError, require_extra

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)  # fmt: skip


def chromium_path() -> str | None:
    """The Chromium executable (``$OCULI_CHROMIUM``, else ``chromium`` on ``PATH``), or None."""
    env = os.environ.get("OCULI_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextmanager
def offline_page(width: int = 1200, height: int = 900) -> Iterator[Any]:
    """A Playwright page in headless Chromium that can load ``file://`` URLs and nothing else.

    The page records what it tried: ``page.oculi_errors`` (console errors and uncaught
    exceptions) and ``page.oculi_requests`` (every URL that was not a local file, aborted).
    """
    exe = chromium_path()
    if exe is None:
        raise MissingExtraError(
            "no Chromium executable: install the Debian package (apt-get install chromium) "
            "or point $OCULI_CHROMIUM at one"
        )
    sync_api = require_extra("playwright.sync_api", "dev")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=list(FLAGS))
        try:
            context = browser.new_context(offline=True, viewport={"width": width, "height": height})
            page = context.new_page()
            page.oculi_errors, page.oculi_requests = [], []

            def guard(route: Any) -> None:
                if route.request.url.startswith(("file://", "data:", "about:")):
                    route.continue_()
                else:
                    page.oculi_requests.append(route.request.url)
                    route.abort()

            page.route("**/*", guard)
            page.on(
                "console",
                lambda m: page.oculi_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: page.oculi_errors.append(str(e)))
            yield page
        finally:
            browser.close()


def screenshot(html: str | Path, png: str | Path) -> list[str]:
    """Render ``html`` offline and save a full-page PNG; returns the page's errors."""
    with offline_page() as page:
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(png), full_page=True)
        return list(page.oculi_errors) + [f"network: {u}" for u in page.oculi_requests]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oculi.visualize.browser", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("--subject", default=None, help="the part of the prompt to corrupt")
    parser.add_argument("--html", type=Path, default=Path("outputs/report.html"))
    parser.add_argument("--png", type=Path, default=Path("outputs/report.png"))
    parser.add_argument("--samples", type=int, default=5, help="causal-tracing noise samples")
    args = parser.parse_args(argv)

    import oculi
    from oculi.visualize.report import write_report

    adapter = oculi.load()
    path = write_report(adapter, args.prompt, args.html, subject=args.subject, samples=args.samples)
    print(f"report: {path} ({path.stat().st_size / 1e3:.0f} kB)")
    problems = screenshot(path, args.png)
    print(f"screenshot: {args.png}")
    for problem in problems:
        print(f"page error: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
