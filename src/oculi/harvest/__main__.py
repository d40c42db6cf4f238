"""``python -m oculi.harvest ARGS`` is ``oculi harvest ARGS`` (see :mod:`oculi.cli.harvest`).

Example::

    python -m oculi.harvest --prompts prompts.jsonl --sites resid_post --layers 0-17 --out acts
"""

from __future__ import annotations

import sys


def main() -> None:
    from oculi.cli import cli

    cli.main(["harvest", *sys.argv[1:]], prog_name="python -m oculi.harvest")


if __name__ == "__main__":
    main()
