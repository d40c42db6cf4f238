"""The documentation site: ``mkdocs build --strict`` succeeds with zero warnings, every public
name (``oculi.__all__`` and each subpackage's) has an entry on its API page and a docstring that
teaches (an example or a shape), the strict configuration really turns a broken link or anchor
into a failed build, nothing is loaded from the network, and the built site works from disk in
headless Chromium (pages render, search finds ``activation_patching``).

The build runs once per session with notebook execution off (``OCULI_DOCS_EXECUTE=0``); the
full build with executed notebooks is ``make docs``, and ``.ci/run`` runs ``make docs-check``
after the tests (that build, then the browser check on its executed pages).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools" / "docs"))
from public_api import reference_pages  # noqa: E402


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OCULI_DOCS_EXECUTE="0",
        NO_MKDOCS_2_WARNING="1",
        DISABLE_MKDOCS_2_WARNING="true",
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    return env


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,  # mkdocs.yml names its hook and extension files relative to the root
        timeout=600,
    )


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built strictly from the repository's docs/ (notebooks not executed)."""
    site = tmp_path_factory.mktemp("docs") / "site"
    run = _mkdocs(ROOT / "mkdocs.yml", site)
    warnings = [line for line in run.stderr.splitlines() if re.match(r"\s*(WARNING|ERROR)", line)]
    assert run.returncode == 0 and not warnings, (
        f"mkdocs build --strict failed ({run.returncode}):\n" + "\n".join(warnings or [run.stderr])
    )
    return site


def test_strict_build_has_every_page(built_site: Path) -> None:
    assert (built_site / "index.html").is_file()
    assert (built_site / "seed002_names.html").is_file()
    # the search index is inlined for file:// use (Material's offline plugin)
    assert (built_site / "search" / "search_index.js").is_file()
    for page in reference_pages():
        assert (built_site / page.path.replace(".md", ".html")).is_file(), page.path


# a script, stylesheet, image or frame loaded from a server, or a CSS url()/@import of one
_REMOTE = re.compile(
    r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=[\"']?(?:https?:)?//"
    r"|url\([\"']?(?:https?:)?//|@import\s+[\"']?(?:url\()?[\"']?(?:https?:)?//"
)


def test_remote_load_pattern() -> None:
    # what Material's offline plugin adds unless a local shim is named in extra.polyfills
    assert _REMOTE.search('<script src="https://unpkg.com/iframe-worker/shim"></script>')
    assert _REMOTE.search("@import url('https://fonts.googleapis.com/css?family=Roboto')")
    assert not _REMOTE.search('<a href="https://github.com/">a link is not a load</a>')


def test_built_site_loads_nothing_from_the_network(built_site: Path) -> None:
    """No page pulls a script, stylesheet, font or image from a server (the browser test
    watches four pages; this reads every file of the build)."""
    found = []
    for path in built_site.rglob("*"):
        if path.suffix in (".html", ".css") and _REMOTE.search(path.read_text(errors="replace")):
            found.append(str(path.relative_to(built_site)))
    assert not found, f"pages that load from the network: {found}"


def test_every_public_name_has_a_reference_entry(built_site: Path) -> None:
    pages = {page.module: page for page in reference_pages()}
    import oculi

    # the pages cover oculi.__all__ and every subpackage's __all__
    assert pages["oculi"].names == tuple(oculi.__all__)
    packages = {
        p.relative_to(ROOT / "src")
        .with_suffix("")
        .as_posix()
        .replace("/__init__", "")
        .replace("/", ".")
        for p in (ROOT / "src" / "oculi").rglob("__init__.py")
        if "__all__" in p.read_text() and "/_" not in p.relative_to(ROOT / "src").as_posix()
    }
    assert packages <= set(pages), packages - set(pages)
    missing = []
    for page in pages.values():
        html = (built_site / page.path.replace(".md", ".html")).read_text()
        ids = set(re.findall(r'id="([^"]+)"', html))
        missing += [f"{page.module}.{n}" for n in page.names if f"{page.module}.{n}" not in ids]
    assert not missing, f"public names without an entry on their API page: {missing}"


def _fixture_site(tmp_path: Path, page: str) -> Path:
    """A two-page site with the repository's own strictness settings and ``page`` as its second
    page: what the real build would do with such a page, in a second instead of a full build."""
    from mkdocs.utils.yaml import yaml_load

    with (ROOT / "mkdocs.yml").open() as f:
        real = yaml_load(f)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n## Somewhere\n\nSee [the other page](other.md).\n")
    (docs / "other.md").write_text(page)
    config = tmp_path / "mkdocs.yml"
    import yaml

    config.write_text(
        yaml.safe_dump(
            {
                "site_name": "fixture",
                "docs_dir": str(docs),
                "use_directory_urls": real["use_directory_urls"],
                "strict": real["strict"],
                "validation": real["validation"],
                "markdown_extensions": ["toc", "attr_list"],
                "nav": ["index.md", "other.md"],
            }
        )
    )
    return config


def test_fixture_strict_config_accepts_good_links(tmp_path: Path) -> None:
    config = _fixture_site(tmp_path, "# Other\n\n[back](index.md#somewhere)\n")
    run = _mkdocs(config, tmp_path / "site")
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize(
    ("page", "complaint"),
    [
        ("# Other\n\n[gone](no-such-page.md)\n", "no-such-page.md"),
        ("# Other\n\n[bad anchor](index.md#nowhere)\n", "#nowhere"),
    ],
)
def test_fixture_broken_link_fails_the_strict_build(
    tmp_path: Path, page: str, complaint: str
) -> None:
    run = _mkdocs(_fixture_site(tmp_path, page), tmp_path / "site")
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert complaint in out and "strict mode" in out, out


def test_built_site_works_offline_in_chromium(built_site: Path, tmp_path: Path) -> None:
    """What ``make docs-check`` does, on the strict build: the landing page, a guide, an API page
    and a tutorial render in headless Chromium opened from disk, with no console error and no
    request for anything but a local file; search (run in the page, offline) finds
    ``activation_patching``."""
    from oculi.visualize.browser import chromium_path

    if chromium_path() is None:
        if os.environ.get("OCULI_REQUIRE_BROWSER"):
            pytest.fail("OCULI_REQUIRE_BROWSER is set but no Chromium executable was found")
        pytest.skip("no Chromium executable (apt-get install chromium, or set $OCULI_CHROMIUM)")
    from check_site import check_site

    result = check_site(built_site, tmp_path)
    assert result.problems == [], "\n".join(result.problems)
    assert {"landing", "guide", "api", "tutorial"} <= set(result.pages)
    assert any("activation_patching" in hit for hit in result.search_hits)
    assert all(png.stat().st_size > 10_000 for png in result.screenshots)  # not blank


def test_site_check_reports_errors_requests_and_missing_pages(tmp_path: Path) -> None:
    """The check is not vacuous: a page that logs an error and asks a server for a script,
    and a site without guide, API page, tutorial or search, each give a problem line."""
    from oculi.visualize.browser import chromium_path

    if chromium_path() is None:
        if os.environ.get("OCULI_REQUIRE_BROWSER"):
            pytest.fail("OCULI_REQUIRE_BROWSER is set but no Chromium executable was found")
        pytest.skip("no Chromium executable (apt-get install chromium, or set $OCULI_CHROMIUM)")
    from check_site import check_site

    (tmp_path / "index.html").write_text(
        "<html><body><article><h1>Broken</h1></article>"
        '<script src="https://cdn.example.org/lib.js"></script>'
        '<script>console.error("boom")</script><input class="md-search__input"></body></html>'
    )
    problems = "\n".join(check_site(tmp_path, search_timeout_ms=500).problems)
    assert "network request: https://cdn.example.org/lib.js" in problems
    assert "console: boom" in problems
    for kind in ("guide", "api", "tutorial"):
        assert f"no {kind} page" in problems
    assert "search found nothing" in problems


def test_site_map_page_is_generated_from_the_code(built_site: Path) -> None:
    """The concepts page's table comes from ``locate`` on every registered family: each kind
    and family is on the built page, and cells agree with facts about the architectures that
    do not come from oculi (GPT-2 and GPT-NeoX have no MLP gate, Gemma 3 normalises q, GPT-2
    fuses q/k/v into ``c_attn``, Phi-3 fuses gate and up)."""
    from site_map import site_map_table

    from oculi.capture.sites import SITE_KINDS
    from oculi.models import supported_model_types

    html = (built_site / "concepts" / "sites.html").read_text()
    assert "oculi:site-map" not in html  # the marker was replaced
    for kind in SITE_KINDS:
        assert f"<code>{kind}</code>" in html, kind
    table = site_map_table()
    sections = {
        part.split("`", 1)[0]: part for part in table.split("\n### `")[1:]
    }  # kind -> its by-family table
    assert "| gpt2, gpt_neox | — (absent) |" in sections["mlp_gate"]
    assert "gate half of `mlp.gate_up_proj` output" in sections["mlp_gate"]
    assert any(
        "gemma3" in line and "`self_attn.q_norm` output" in line
        for line in sections["q_pre"].splitlines()
    )
    assert any(
        line.startswith("| gpt2 |") and "q part of `attn.c_attn` output" in line
        for line in sections["q_pre"].splitlines()
    )
    families = (built_site / "concepts" / "architectures.html").read_text()
    for model_type in supported_model_types():
        assert f"<code>{model_type}</code>" in families, model_type


def test_unknown_table_marker_fails_the_build() -> None:
    import hooks

    page = type("Page", (), {"file": type("F", (), {"src_path": "x.md"})()})()
    with pytest.raises(ValueError, match="unknown table marker"):
        hooks.on_page_markdown("<!-- oculi:no-such-table -->", page)


# What counts as teaching: an example (a literal block ``::``, a doctest ``>>>``, a fenced
# block, or a call written as code, ``adapter.capture(...)``) or a shape (``[B, T, d_model]``,
# ``[L, H, T, T]``: brackets of dimension names).
_EXAMPLE = re.compile(r"::\s*\n\s*\n\s+\S|>>>|```|``[^`]*\w\([^`]*``")
_DIM = re.compile(
    r"^(?:[A-Za-z](?:_\w+)?|d_\w+|n_\w+|\w*(?:batch|seq|pos|layer|head|vocab|token|row|col|"
    r"feature|prompt|neuron|latent|unit|sample|step|edge|node|chunk|width)s?\w*|\d+|\.\.\.|·|…)$"
)
_BRACKETS = re.compile(r"\[([^\[\]\n]+)\]")


def _teaches(doc: str) -> bool:
    if _EXAMPLE.search(doc):
        return True
    for group in _BRACKETS.findall(doc):
        items = [item.strip(" `*") for item in group.split(",")]
        if all(_DIM.match(item) for item in items) and any(
            not item.isdigit() and item not in ("...", "·", "…") for item in items
        ):
            return True
    return False


def test_every_public_name_has_a_docstring_that_teaches() -> None:
    """Each name on the API pages has a docstring (as the site renders it: attribute
    docstrings included, read statically by griffe) with an example or a shape."""
    import importlib
    import inspect

    import griffe

    package = griffe.load("oculi", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    missing, untaught = [], []
    for page in reference_pages():
        module = importlib.import_module(page.module)
        for name in page.names:
            value = getattr(module, name)
            path = f"{page.module}.{name}"
            obj = package.get_member(path.removeprefix("oculi.")) if path != "oculi" else package
            if obj.is_module and not inspect.ismodule(value):  # a function named like a module
                canonical = f"{value.__module__}.{value.__qualname__}"
                obj = package.get_member(canonical.removeprefix("oculi."))
            doc = obj.docstring.value if obj.docstring else ""
            if not doc.strip():
                missing.append(path)
            elif not _teaches(doc):
                untaught.append(path)
    assert not missing, f"public names without a docstring: {missing}"
    assert not untaught, f"docstrings with neither an example nor a shape: {untaught}"


@pytest.mark.parametrize(
    ("doc", "teaches"),
    [
        ("Residuals, ``[L, T, d_model]``.", True),
        ("Scores ``[n_layers, n_heads]`` per head.", True),
        ("Use it like this::\n\n    x = f(1)\n", True),
        ("Call ``adapter.capture(prompt)`` first.", True),
        (">>> f(2)\n3", True),
        ("A dict[str, int] of counts.", False),  # a type, not a shape
        ("Raised when something is wrong.", False),
        ("See [the guide](x.md).", False),
    ],
)
def test_teaching_rule(doc: str, teaches: bool) -> None:
    assert _teaches(doc) is teaches


def test_rst_literal_blocks_become_fences() -> None:
    from griffe_rst import _literal_blocks

    text = "Intro::\n\n    x = f(1)\n\nDiagram::\n\n    a ─┬─ b\n\nExample::\n\n    y = 2\n\nend"
    assert _literal_blocks(text) == (
        "Intro:\n\n```python\nx = f(1)\n```\n\n"
        "Diagram:\n\n```text\na ─┬─ b\n```\n\n"
        "*Example:*\n\n```python\ny = 2\n```\n\nend"
    )


def test_rst_roles_become_links_on_the_built_pages(built_site: Path) -> None:
    """``:class:`~oculi.sae.SAE``` in activation_patching's docstring is a link to the SAE
    entry on the sae page, and no role survives as text on any API page."""
    html = (built_site / "reference" / "oculi" / "patching.html").read_text()
    assert re.search(
        r'href="sae\.html#oculi\.sae\.SAE"[^>]*>\s*<code>(oculi\.sae\.)?SAE</code>', html
    )
    for page in reference_pages():
        text = (built_site / page.path.replace(".md", ".html")).read_text()
        assert not re.search(r":(class|func|meth|mod):`", text), page.path
        assert "::</p>" not in text, page.path  # a literal block left as prose
