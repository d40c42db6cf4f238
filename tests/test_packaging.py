"""Packaging: the ``all`` extra and the Makefile's test targets say what the README says."""

from __future__ import annotations

import shutil
import subprocess
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
    # a new runtime extra must be listed here (and so land in `all`); dev and the test-only
    # compare, sae-compare and quantized and the documentation build (docs) stay out
    assert set(extras) == {
        *RUNTIME_EXTRAS,
        "all",
        "dev",
        "docs",
        "compare",
        "sae-compare",
        "quantized",
    }
    union = {req for name in RUNTIME_EXTRAS for req in extras[name]}
    assert len(extras["all"]) == len(set(extras["all"])), "a requirement listed twice"
    assert set(extras["all"]) == union


def _make_commands(*targets: str) -> list[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -n prints the recipes without running them (nor the venv setup they depend on)
    out = subprocess.run(
        ["make", "-n", "-C", str(ROOT), *targets], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if "-m pytest" in line]


def test_make_test_targets_split_the_suite_by_the_gemma_marker():
    assert _make_commands("test") == [".venv/bin/python -m pytest -q"]  # the README's command
    assert _make_commands("test-unit") == ['.venv/bin/python -m pytest -q -m "not gemma"']
    assert _make_commands("test-integration") == [".venv/bin/python -m pytest -q -m gemma"]
    development = (ROOT / "README.md").read_text().split("## Development", 1)[1]
    assert "make test-unit" in development and "make test-integration" in development
