"""Experiment configs: YAML validated by pydantic, errors that name the key.

::

    cfg = load_config("configs/logit_lens.yaml", LogitLensConfig)
    cfg.prompt, cfg.target, cfg.seed

Every experiment's config subclasses :class:`ExperimentConfig` (the model, device, dtype, seed
and tag every run has) and adds its own keys. Unknown keys are refused, and a wrong type or
value is reported with its key path and what is allowed::

    ConfigError: configs/x.yaml: kind: must be one of 'resid', 'mlp', 'attn' (got 'mpl')

The YAML is read with :class:`ConfigLoader`: plain YAML without anchors or aliases (``&a``,
``*a``: a 558-byte "billion laughs" file of nested aliases would otherwise stand for gigabytes),
and a key written twice is an error naming the key and its lines, not "the last one wins".
Integers must fit in 64 bits; values quoted back in messages are cut short (:func:`brief`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from oculi.errors import InputError, brief

INT64 = (-(2**63), 2**63 - 1)

Dtype = Literal["auto", "float32", "bfloat16", "float16", "float64"]


class ConfigError(InputError):
    """A config that is not valid YAML, has unknown keys, or values of the wrong type.

    It is a ``ValueError`` naming the key and what it accepts::

        run_experiment("logit_lens", {"promt": "Hello"})
        # ConfigError: config: prompt: required key is missing; promt: unknown key; ...
    """


class ExperimentConfig(BaseModel):
    """Keys every experiment config has.

    Attributes:
        experiment: the experiment's name (optional; checked against the one run).
        model: ``"gemma-3-270m"`` (the embedded default), a local folder, a ``.gguf`` file or a
            Hugging Face Hub id.
        device: ``cpu``, ``cuda``, ``mps`` (default: the best available).
        dtype: the weights' dtype (default: the checkpoint's own).
        seed: seeds torch, numpy and random before the run (noise, sampling); ``0 .. 2**64 - 1``.
        tag: the run folder's name under ``outputs/<experiment>/`` (default ``"default"``).

    Example::

        class MyProbeConfig(ExperimentConfig):
            prompt: str
            layer: int = 6
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    experiment: str | None = None
    model: str = "gemma-3-270m"
    device: str | None = None
    dtype: Dtype | None = None
    seed: int = Field(default=0, ge=0, le=2**64 - 1)
    tag: str | None = None

    @field_validator("device")
    @classmethod
    def _usable_device(cls, value: str | None) -> str | None:
        """A device this torch can use, checked before the model loads."""
        if value is not None:
            from oculi.utils import resolve_device

            resolve_device(value)
        return value


C = TypeVar("C", bound=ExperimentConfig)


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _int_range(schema: type[BaseModel], loc: tuple[Any, ...]) -> tuple[int, int]:
    """The integers a top-level key accepts: its ``ge``/``le`` bounds within 64 bits."""
    lo, hi = INT64
    field = schema.model_fields.get(str(loc[0])) if loc else None
    for m in field.metadata if field is not None else ():
        bound = {k: getattr(m, k, None) for k in ("ge", "gt", "le", "lt")}
        if isinstance(bound["ge"], int):
            lo = bound["ge"]
        if isinstance(bound["gt"], int):
            lo = bound["gt"] + 1
        if isinstance(bound["le"], int):
            hi = bound["le"]
        if isinstance(bound["lt"], int):
            hi = bound["lt"] - 1
    return lo, hi


def _message(err: Mapping[str, Any], schema: type[BaseModel]) -> str:
    kind, loc = err["type"], err["loc"]
    got = brief(err.get("input"))
    if kind == "extra_forbidden":
        valid = sorted(schema.model_fields) if len(loc) == 1 else None
        hint = f"; valid keys: {', '.join(valid)}" if valid else ""
        return f"{_path(loc)}: unknown key{hint}"
    if kind == "missing":
        return f"{_path(loc)}: required key is missing"
    if kind in ("literal_error", "enum"):
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{_path(loc)}: must be one of {str(allowed)[:200]} (got {got})"
    if kind.startswith("int_"):
        lo, hi = _int_range(schema, loc)
        return f"{_path(loc)}: must be an integer from {lo} to {hi} (got {got})"
    msg = err["msg"].removeprefix("Value error, ")[:300]
    return f"{_path(loc)}: {msg[0].lower() + msg[1:]} (got {got})"


def _beyond_int64(data: Mapping[str, Any]) -> str | None:
    """The first integer (at the top level or in a list) outside 64 bits, as a message."""
    for key, value in data.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(values):
            if isinstance(v, int) and not isinstance(v, bool) and not INT64[0] <= v <= INT64[1]:
                where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else str(key)
                return (
                    f"{where}: must be an integer from {INT64[0]} to {INT64[1]} "
                    f"(got {brief(v, 40)})"
                )
    return None


def validate_config(data: Any, schema: type[C], *, source: str = "config") -> C:
    """``schema`` validated from a mapping; :class:`ConfigError` naming every bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of keys to values, "
            f"got {type(data).__name__}"
        )
    try:
        cfg = schema.model_validate(dict(data))
    except ValidationError as exc:
        problems = "; ".join(_message(e, schema) for e in exc.errors()[:10])
        raise ConfigError(f"{source}: {problems}") from None
    huge = _beyond_int64(cfg.model_dump())
    if huge is not None:
        raise ConfigError(f"{source}: {huge}")
    return cfg


def check_position(key: str, position: int, n_tokens: int) -> int:
    """``position`` if it indexes a prompt of ``n_tokens`` tokens, else :class:`ConfigError`
    naming the key and the range (an experiment calls this once the prompt is tokenized)."""
    if not -n_tokens <= position < n_tokens:
        raise ConfigError(
            f"{key}: {brief(position, 40)} is outside the prompt's {n_tokens} tokens; use "
            f"{-n_tokens} .. {n_tokens - 1} (-1: the last)"
        )
    return position


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document at ``path``, read with :class:`ConfigLoader`.

    Raises:
        ConfigError: a missing file, a file that is not UTF-8 text, invalid YAML, an anchor or
            alias, a duplicate key; the message names the file (and the line).
    """
    import yaml

    from oculi.experiments.yaml_loader import ConfigLoader, DuplicateKeyError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config file {brief(str(path), 200)} does not exist")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start} on line {line} is "
            f"0x{raw[exc.start]:02x}); save the config as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem[:300]}") from None


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
