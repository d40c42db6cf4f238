"""MkDocs hook: whether the build executes the tutorial notebooks (``OCULI_DOCS_EXECUTE``).

``mkdocs.yml`` has mkdocs-jupyter execute every notebook (``execute: true``, ``allow_errors:
false``: a cell that raises fails the build), so the pages show the outputs of this build, never
outputs stored in the files (the notebooks are committed without any; tests/test_tutorials.py
checks it). ``OCULI_DOCS_EXECUTE=0`` renders them without running them: the quick strict build
inside the test suite uses it, since tests/test_tutorials.py already executes each notebook
once and checks its numbers. Unset, ``1`` or ``true``: execute.
"""

from __future__ import annotations

import os
from typing import Any

from mkdocs.exceptions import ConfigurationError

_ON = {"", "1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def on_config(config: Any) -> Any:
    value = os.environ.get("OCULI_DOCS_EXECUTE", "").strip().lower()
    if value not in _ON | _OFF:
        raise ConfigurationError(
            f"OCULI_DOCS_EXECUTE must be 1/true (execute the notebooks) or 0/false (render them "
            f"unexecuted), got {os.environ['OCULI_DOCS_EXECUTE']!r}"
        )
    plugin = config.plugins.get("mkdocs-jupyter")
    if plugin is None:
        raise ConfigurationError("mkdocs.yml lists no mkdocs-jupyter plugin to configure")
    plugin.config["execute"] = value in _ON
    return config
