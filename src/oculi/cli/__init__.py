"""The ``oculi`` command: a thin layer of argument parsing over oculi's Python API.

::

    oculi info                                      # the default model, Gemma 3 270M
    oculi lens "The Eiffel Tower is located in the city of" --target " Paris"
    oculi run logit_lens --config configs/logit_lens.yaml --tag first
    python -m oculi verify --json
    oculi harvest --prompts prompts.jsonl --sites resid_post --layers 0-17 --out acts
    oculi sae train --store acts --site resid_post --layer 6 --d-sae 4096 --k 32 --out sae6

Every command takes ``--model`` (default: the embedded Gemma 3 270M), ``--device`` and
``--dtype``; most take ``--json`` for machine-readable output. A bad input ends the command with
one line on stderr and exit status 2 (``--debug``, or ``OCULI_DEBUG=1``, shows the traceback).

Adding a command (one module per command group, one line to register it):

1. Write ``src/oculi/cli/<name>.py`` defining a ``click`` command. Import only ``click`` and
   ``oculi.cli._options`` at module level (``oculi --help`` imports every command module and
   must stay under half a second); import torch, transformers and the rest of oculi inside the
   command's function. Decorate it with ``@model_options`` (``--model/--device/--dtype``) and
   ``@json_option`` where it fits, and load the model with ``load_adapter(model, device,
   dtype)``. Raise oculi's errors (or ``click.BadParameter``) for bad input; the group turns
   them into one line and exit 2.
2. Add one line to :data:`COMMANDS` below: ``"harvest": "oculi.cli.harvest:harvest",``.

Commands are listed in ``oculi --help`` in the order of :data:`COMMANDS`.
"""

from __future__ import annotations

#: command name -> "module:attribute" of its click command (the registration point)
COMMANDS: dict[str, str] = {
    "info": "oculi.cli.info:info",
    "lens": "oculi.cli.lens:lens",
    "heads": "oculi.cli.heads:heads",
    "attribute": "oculi.cli.attribute:attribute",
    "patch": "oculi.cli.patch:patch",
    "trace": "oculi.cli.patch:trace",
    "discover": "oculi.cli.discover:discover",
    "generate": "oculi.cli.generate:generate",
    "run": "oculi.cli.run:run",
    "report": "oculi.cli.report:report",
    "verify": "oculi.cli.verify:verify",
    "harvest": "oculi.cli.harvest:harvest",
    "sae": "oculi.cli.sae:sae",
}
"""Every ``oculi`` command, loaded on first use (``oculi --help`` imports none of them).

::

    COMMANDS["lens"]            # "oculi.cli.lens:lens"
"""

from oculi.cli._app import cli, main  # noqa: E402 - the group reads COMMANDS

cli.lazy = COMMANDS

__all__ = ["COMMANDS", "cli", "main"]
