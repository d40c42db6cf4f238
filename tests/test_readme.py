"""README.md is a landing page that stays true: short, its links lead to files that exist, and its
one example runs on Gemma 3 270M and gives the shapes its comments state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_a_landing_page():
    assert len(README.splitlines()) <= 150
    # the two commands at the top, as the Makefile and .ci/run run them
    assert README.split("```bash\n", 1)[1].startswith("make demo ") and "\nmake test " in README
    assert "make docs" in README and "make docs-serve" in README


def test_readme_links_lead_to_existing_files():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    relative = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert relative, "the README links into docs/"
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"
    assert any(link.startswith("docs/guides/") for link in relative)


@pytest.mark.gemma
def test_readme_example_gives_the_shapes_it_states(gemma):
    code = README.split("```python\n", 1)[1].split("```", 1)[0]
    # the example's first line loads the default model: the session's Gemma is that model
    namespace: dict = {"gemma": gemma}
    exec(compile(code.replace("oculi.load()", "gemma"), "README.md", "exec"), namespace)
    stated = re.findall(r"^(\S[^#\n]*?)\s+# \[([\d, ]+)\]", code, re.M)
    assert len(stated) >= 5
    for expression, shape in stated:  # "full.residual.pre_attn.shape   # [18, 10, 640]"
        value = eval(expression, namespace)  # noqa: S307 - the README's own expression
        assert tuple(value) == tuple(int(d) for d in shape.split(",")), expression
