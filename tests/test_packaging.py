"""Packaging: the ``all`` extra is every runtime extra."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_EXTRAS = ("viz", "umap", "export", "stats", "store", "scale", "probe")


def test_all_extra_is_the_union_of_the_runtime_extras():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    # a new runtime extra must be listed here (and so land in `all`); dev and compare stay out
    assert set(extras) == {*RUNTIME_EXTRAS, "all", "dev", "compare"}
    union = {req for name in RUNTIME_EXTRAS for req in extras[name]}
    assert len(extras["all"]) == len(set(extras["all"])), "a requirement listed twice"
    assert set(extras["all"]) == union
