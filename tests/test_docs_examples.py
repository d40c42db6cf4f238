"""Every code example on the documentation pages runs, and prints what the page shows.

The convention (the documentation pages under ``docs/`` follow it; see also issue 21):

- Every fenced block opened with ```` ```python ```` on a page under ``docs/`` (any depth) runs,
  in page order, in **one namespace per page**: a later block sees the names an earlier one
  defined, and no page sees another's. The working directory is a fresh temporary folder, so a
  block may write files next to itself. ``torch`` is seeded with 0 before each page.
- A ```` ```text ```` block that comes **directly after** a python block (only blank lines
  between) is the output that block must print. It is compared with :mod:`doctest`'s
  ``OutputChecker`` under ``ELLIPSIS | NORMALIZE_WHITESPACE``: write ``...`` for the parts that
  vary (timings, paths, digits past what matters), line breaks and runs of spaces are not
  compared. A python block with no text block after it may print anything.
- A block opened with ```` ```py ```` (or any other language) is shown, never run: use it for
  snippets that need a GPU, a network, a big model or a placeholder path.
- A page whose python blocks call ``oculi.load(`` loads the real Gemma 3 270M and is marked
  ``gemma`` (``pytest -m "not gemma"`` skips it, as for the other integration tests). Detection
  is by that text, so a new page needs no registration.
- Blocks inside lists or admonitions may be indented: the fence's own indentation is removed
  from the block.

Speed and reproducibility: the pages run in the test process, and ``oculi.load`` is memoised
for them: the first call with given arguments loads, later pages calling it with the same
arguments get the same adapter. ``oculi.load()`` (and ``oculi.load(device="cpu")``) gets the
session's ``gemma`` fixture, Gemma 3 270M on the CPU in float32, also on a machine with a GPU:
the pages' printed numbers were taken there, and a GPU's kernels differ in the last digits.
Sharing one adapter is sound because oculi never leaves a model modified (hooks are removed,
also on errors); a page that did would change the numbers of the pages after it.

The runner itself is tested on a deliberately broken page, ``tests/fixtures/docs_broken.md``,
which is not under ``docs/`` and so is not a documentation page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import io
import os
import re
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BROKEN_PAGE = Path(__file__).resolve().parent / "fixtures" / "docs_broken.md"

# An opening or closing fence: indentation, three or more backticks or tildes, the info string.
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block on a page.

    Attributes:
        language: the first word of the fence's info string (``python``, ``text``, ``py``...).
        line: the 1-based line number of the opening fence on the page.
        code: the block's text with the fence's indentation removed, ending in a newline.
        expected: for a python block, the text block directly after it (``None`` if none).
        expected_line: the opening line of that text block.
    """

    language: str
    line: int
    code: str
    expected: str | None = None
    expected_line: int | None = None


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page, each python block paired with its expected output.

    Args:
        text: the page's Markdown.

    Returns:
        Every fenced block in page order. A ``text`` block directly after a ``python`` block
        (blank lines allowed between) is attached to it as ``expected`` and also listed itself.

    Raises:
        ValueError: a fence is opened and never closed (the page would render everything after
            it as code).
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    # The line index after the previous block's closing fence, to tell "directly after".
    previous_end = -1
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        info = opening["info"].strip().lstrip("{").lstrip(".")
        language = re.split(r"[\s{}]", info, maxsplit=1)[0].lower() if info else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            line = lines[j]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            j += 1
        else:
            raise ValueError(f"line {i + 1}: the {fence} fence opened here is never closed")
        block = Block(language, i + 1, "\n".join(body) + "\n")
        directly_after = previous_end >= 0 and all(not s.strip() for s in lines[previous_end:i])
        if (
            language == "text"
            and directly_after
            and blocks
            and blocks[-1].language == "python"
            and blocks[-1].expected is None
        ):
            blocks[-1] = dataclasses.replace(blocks[-1], expected=block.code, expected_line=i + 1)
        blocks.append(block)
        previous_end = j + 1
        i = j + 1
    return blocks


def run_page(path: Path, workdir: Path) -> list[str]:
    """Run a page's python blocks in order and return its failures (empty if all is well).

    Args:
        path: the Markdown page.
        workdir: the working directory the blocks run in (the caller makes it fresh).

    Returns:
        One message per failure, each starting ``<page>:<fence line>:``. A block that raises
        ends the run (its traceback is the message); a wrong output is a message showing the
        expected and the printed text, and the run goes on.
    """
    import torch

    blocks = [b for b in parse_blocks(path.read_text()) if b.language == "python"]
    namespace: dict[str, object] = {"__name__": "__docs__", "__file__": str(path)}
    checker = doctest.OutputChecker()
    failures: list[str] = []
    shown = _shown_name(path)
    here = Path.cwd()
    torch.manual_seed(0)
    try:
        os.chdir(workdir)
        for block in blocks:
            # Compiled at its place in the page, so the traceback's line numbers are the page's.
            code = compile("\n" * block.line + block.code, str(path), "exec")
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(code, namespace)
            except BaseException as error:
                if isinstance(error, KeyboardInterrupt):
                    raise
                trace = "".join(traceback.format_exception(error))
                failures.append(
                    f"{shown}:{block.line}: the python block raised "
                    f"{type(error).__name__}:\n{trace}"
                    + (f"\nIt had printed:\n{printed.getvalue()}" if printed.getvalue() else "")
                )
                break
            if block.expected is not None and not checker.check_output(
                block.expected, printed.getvalue(), OPTIONS
            ):
                difference = checker.output_difference(
                    doctest.Example("", block.expected), printed.getvalue(), OPTIONS
                )
                failures.append(
                    f"{shown}:{block.line}: the python block's output differs from the text "
                    f"block at line {block.expected_line}:\n{difference}"
                )
    finally:
        os.chdir(here)
    return failures


def _shown_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _loads_gemma(path: Path) -> bool:
    return any(
        "oculi.load(" in b.code for b in parse_blocks(path.read_text()) if b.language == "python"
    )


def _pages() -> list:
    pages = sorted(DOCS.rglob("*.md"))
    params = []
    for page in pages:
        marks = [pytest.mark.gemma] if _loads_gemma(page) else []
        params.append(pytest.param(page, marks=marks, id=str(page.relative_to(DOCS))))
    return params


# oculi.load's arguments -> the adapter it returned, for every page of the session
_LOADED: dict[str, object] = {}


def _memoised_load(gemma: object):
    """``oculi.load`` remembering what it returned; ``gemma`` stands for the default load."""
    import oculi
    from oculi.models import load

    def cached_load(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in _LOADED:
            default = not args and all((k, v) == ("device", "cpu") for k, v in kwargs.items())
            _LOADED[key] = gemma if default else load(*args, **kwargs)
        return _LOADED[key]

    cached_load.__doc__ = oculi.load.__doc__
    return cached_load


@pytest.mark.parametrize("page", _pages())
def test_docs_page_examples(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
):
    """Every python block on the page runs, and prints the text block shown after it."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    if _loads_gemma(page):
        import oculi

        monkeypatch.setattr(oculi, "load", _memoised_load(request.getfixturevalue("gemma")))
    with _registries_kept():  # a page registering its own experiment leaves no trace
        failures = run_page(page, tmp_path)
    assert not failures, "\n\n".join(failures)


@contextlib.contextmanager
def _registries_kept():
    """What a page registers itself (an experiment defined on the page, an anatomy) is gone
    after the block; oculi's own entries, also those imported lazily meanwhile, stay."""
    import oculi.models  # noqa: F401  (registers the built-in anatomies)
    from oculi.experiments.registry import EXPERIMENTS
    from oculi.models.anatomy import _REGISTRY

    experiments, anatomies = dict(EXPERIMENTS), dict(_REGISTRY)
    try:
        yield
    finally:
        for name, cls in list(EXPERIMENTS.items()):
            if name not in experiments and not cls.__module__.startswith("oculi."):
                del EXPERIMENTS[name]
        _REGISTRY.clear()
        _REGISTRY.update(anatomies)


# --- the runner on a page that is wrong on purpose ------------------------------------------


def _fence_line(text: str, marker: str) -> int:
    """The line of the python fence just above the line holding ``marker``."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)
    return max(i for i in range(at) if lines[i].startswith("```python")) + 1


def test_runner_reports_the_failing_fences_of_a_broken_page(tmp_path: Path):
    text = BROKEN_PAGE.read_text()
    failures = run_page(BROKEN_PAGE, tmp_path)
    wrong_output = _fence_line(text, "MARK: wrong output")
    raising = _fence_line(text, "MARK: raises")
    raising_statement = next(
        i + 1 for i, line in enumerate(text.splitlines()) if "MARK: raises" in line
    )
    assert len(failures) == 2, failures
    output_failure, raise_failure = failures
    # The wrong output: the page, the fence's line, the text block's line and the difference.
    assert output_failure.startswith(f"tests/fixtures/docs_broken.md:{wrong_output}: ")
    assert "differs from the text block at line" in output_failure
    assert "Expected:\n    total = 7\nGot:\n    total = 6" in output_failure
    # The raising block: the page, the fence's line, the error and the page line that raised.
    assert raise_failure.startswith(f"tests/fixtures/docs_broken.md:{raising}: ")
    assert "ZeroDivisionError" in raise_failure
    assert f'docs_broken.md", line {raising_statement}' in raise_failure
    # Blocks before ran in one namespace; the block after the raising one never ran.
    assert not (tmp_path / "after_the_error.txt").exists()
    assert (tmp_path / "first_block.txt").read_text() == "written in the temporary folder"


def test_runner_pairs_outputs_and_skips_shown_blocks():
    page = """
Intro.

```python
print("a")
```

```text
a
```

```py
this is shown, not run
```

```text
not an expected output: it follows a py block
```

- a list item

    ```python
    x = 1
    ```
    Some words.

    ```text
    not paired: words stand between
    ```
"""
    blocks = parse_blocks(page)
    assert [(b.language, b.line) for b in blocks] == [
        ("python", 4),
        ("text", 8),
        ("py", 12),
        ("text", 16),
        ("python", 22),
        ("text", 27),
    ]
    assert blocks[0].expected == "a\n" and blocks[0].expected_line == 8
    assert blocks[4].code == "x = 1\n" and blocks[4].expected is None
    with pytest.raises(ValueError, match="line 2: the ``` fence opened here is never closed"):
        parse_blocks("text\n```python\nx = 1\n")


def test_ellipsis_and_whitespace_are_forgiven(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nprint('value: 3.14159   units')\nprint([1, 2, 3])\n```\n\n"
        "```text\nvalue: 3.14...  units\n[1, 2,\n 3]\n```\n"
    )
    assert run_page(page, tmp_path) == []
    page.write_text("```python\nprint('value: 2.7')\n```\n```text\nvalue: 3.14...\n```\n")
    (failure,) = run_page(page, tmp_path)
    assert failure.startswith(f"{page}:1: ") and "line 4" in failure
