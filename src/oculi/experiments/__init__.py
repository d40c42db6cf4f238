"""Experiments: registered, configured by YAML, written to reproducible run folders.

::

    from oculi.experiments import run_experiment
    run = run_experiment("causal_tracing", "configs/causal_tracing.yaml", tag="eiffel")
    run.folder                      # outputs/causal_tracing/eiffel/
    run.result["provenance"]        # versions, model hash, device, dtype, seed, git SHA, ...

or from the shell: ``oculi run causal_tracing --config configs/causal_tracing.yaml --tag eiffel``.
Add your own with :func:`register_experiment` (see :mod:`oculi.experiments.registry`).
"""

from oculi.experiments.config import ConfigError, ExperimentConfig, load_config
from oculi.experiments.parity import ParityReport, verify
from oculi.experiments.registry import (
    EXPERIMENTS,
    Experiment,
    Outcome,
    get_experiment,
    register_experiment,
)
from oculi.experiments.runner import Run, run_experiment

__all__ = [
    "EXPERIMENTS",
    "ConfigError",
    "Experiment",
    "ExperimentConfig",
    "Outcome",
    "ParityReport",
    "Run",
    "get_experiment",
    "load_config",
    "register_experiment",
    "run_experiment",
    "verify",
]
