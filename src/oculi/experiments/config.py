"""Experiment configs: YAML validated by pydantic, errors that name the key.

::

    cfg = load_config("configs/logit_lens.yaml", LogitLensConfig)
    cfg.prompt, cfg.target, cfg.seed

Every experiment's config subclasses :class:`ExperimentConfig` (the model, device, dtype, seed
and tag every run has) and adds its own keys. Unknown keys are refused, and a wrong type or
value is reported with its key path and what is allowed::

    ConfigError: configs/x.yaml: kind: must be one of 'resid', 'mlp', 'attn' (got 'mpl')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from oculi.errors import InputError

Dtype = Literal["auto", "float32", "bfloat16", "float16", "float64"]


class ConfigError(InputError):
    """A config that is not valid YAML, has unknown keys, or values of the wrong type."""


class ExperimentConfig(BaseModel):
    """Keys every experiment config has.

    Attributes:
        experiment: the experiment's name (optional; checked against the one run).
        model: ``"gemma-3-270m"`` (the embedded default), a local folder, a ``.gguf`` file or a
            Hugging Face Hub id.
        device: ``cpu``, ``cuda``, ``mps`` (default: the best available).
        dtype: the weights' dtype (default: the checkpoint's own).
        seed: seeds torch, numpy and random before the run (noise, sampling).
        tag: the run folder's name under ``outputs/<experiment>/`` (default ``"default"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    experiment: str | None = None
    model: str = "gemma-3-270m"
    device: str | None = None
    dtype: Dtype | None = None
    seed: int = 0
    tag: str | None = None


C = TypeVar("C", bound=ExperimentConfig)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _message(err: Mapping[str, Any], schema: type[BaseModel]) -> str:
    kind, loc = err["type"], err["loc"]
    got = err.get("input")
    if kind == "extra_forbidden":
        valid = sorted(schema.model_fields) if len(loc) == 1 else None
        hint = f"; valid keys: {', '.join(valid)}" if valid else ""
        return f"{_path(loc)}: unknown key{hint}"
    if kind == "missing":
        return f"{_path(loc)}: required key is missing"
    if kind in ("literal_error", "enum"):
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{_path(loc)}: must be one of {allowed} (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{_path(loc)}: {msg[0].lower() + msg[1:]} (got {got!r})"


def validate_config(data: Any, schema: type[C], *, source: str = "config") -> C:
    """``schema`` validated from a mapping; :class:`ConfigError` naming every bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    try:
        return schema.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(_message(e, schema) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document at ``path``; :class:`ConfigError` for a missing file or bad YAML."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_config(
    source: str | os.PathLike | Mapping[str, Any], schema: type[C], **overrides: Any
) -> C:
    """Read (a YAML path) or take (a mapping) a config, apply non-None ``overrides``, validate.

    Example::

        cfg = load_config("configs/causal_tracing.yaml", CausalTracingConfig, seed=3)
    """
    if isinstance(source, (str, os.PathLike)):
        data, name = read_yaml(source), str(source)
        if data is None:  # an empty file: every key at its default
            data = {}
    else:
        data, name = (dict(source) if isinstance(source, Mapping) else source), "config"
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(data, schema, source=name)
