"""The experiment registry: a name, a config schema and a function from a model to numbers.

::

    @register_experiment("my_probe")
    class MyProbe(Experiment):
        Config = MyProbeConfig                 # an ExperimentConfig subclass
        direction = None                       # or how activations are patched, for provenance

        def run(self, adapter, cfg):
            ...
            return Outcome(numbers={...}, figures={"probe": fig}, prompt=cfg.prompt)

Registered experiments run with ``oculi run my_probe --config cfg.yaml`` or
:func:`oculi.experiments.run_experiment`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from oculi.errors import did_you_mean
from oculi.experiments.config import ConfigError, ExperimentConfig


@dataclass
class Outcome:
    """What an experiment returns.

    Attributes:
        numbers: plain JSON-able results (lists, floats, strings).
        figures: name -> matplotlib ``Figure``, saved as ``<name>.png`` and ``<name>.svg``.
        prompt: the prompt the run's parity check uses.

    Example::

        return Outcome(numbers={"top": ["Paris"]}, figures={"lens": fig}, prompt=cfg.prompt)
    """

    numbers: dict[str, Any]
    figures: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None


class Experiment:
    """Base class of registered experiments.

    Subclass it and register it (see the module docstring)::

        @register_experiment("my_probe")
        class MyProbe(Experiment):
            Config = MyProbeConfig

            def run(self, adapter, cfg):
                return Outcome(numbers={...}, prompt=cfg.prompt)
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[ExperimentConfig]] = ExperimentConfig
    #: for provenance: how activations move between runs, or None
    direction: ClassVar[str | None] = None

    def run(self, adapter: Any, cfg: Any) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


EXPERIMENTS: dict[str, type[Experiment]] = {}
"""Every registered experiment by name (filled by :func:`register_experiment`; the built-in
ones once :mod:`oculi.experiments.builtin` is imported).

::

    import oculi.experiments.builtin
    sorted(EXPERIMENTS)         # ["activation_patching", "attribution", "causal_tracing", ...]
"""


def register_experiment(name: str) -> Callable[[type[Experiment]], type[Experiment]]:
    """Class decorator registering an :class:`Experiment` under ``name``.

    ::

        @register_experiment("my_probe")
        class MyProbe(Experiment): ...
    """

    def deco(cls: type[Experiment]) -> type[Experiment]:
        if name in EXPERIMENTS and EXPERIMENTS[name] is not cls:
            raise ValueError(f"an experiment named {name!r} is already registered")
        cls.name = name
        EXPERIMENTS[name] = cls
        return cls

    return deco


def get_experiment(name: str) -> type[Experiment]:
    """The registered experiment ``name``; ``ConfigError`` listing the known ones.

    ::

        get_experiment("logit_lens").Config      # the experiment's config schema
    """
    import oculi.experiments.builtin  # noqa: F401 - registers the built-in experiments

    if name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment {name!r}{did_you_mean(name, EXPERIMENTS)}; "
            f"registered: {', '.join(sorted(EXPERIMENTS))}"
        )
    return EXPERIMENTS[name]
