"""Running a registered experiment into a run folder.

::

    run = run_experiment("logit_lens", "configs/logit_lens.yaml", tag="first")
    run.folder          # outputs/logit_lens/first/
    run.result["result"]["crossover_layer"]

A run folder holds ``result.json`` (the numbers, the resolved config, provenance and the
parity check of the run's own prompt), ``config.yaml`` (the resolved config: rerunning it
reproduces the numbers) and each figure as ``<name>.png`` and ``<name>.svg``. It is written
into a temporary folder and renamed into place, so a crash never leaves half a run; an
existing run is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oculi.experiments.config import load_config
from oculi.experiments.provenance import now, provenance
from oculi.experiments.registry import get_experiment


@dataclass(frozen=True)
class Run:
    """A finished run: its folder and the content of its ``result.json``."""

    folder: Path
    result: dict[str, Any]


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_folder(out_dir: str | os.PathLike, experiment: str, tag: str) -> Path:
    """``out_dir/experiment/tag``, with ``~`` expanded; the tag must be a plain name."""
    from oculi.experiments.config import ConfigError

    if not tag or tag in (".", "..") or any(c in tag for c in "/\\\0"):
        raise ConfigError(f"tag {tag!r} must be a plain folder name (no slashes)")
    return Path(out_dir).expanduser() / experiment / tag


def _check_free(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a run; choose another --tag, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    parent = folder.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write a run under {parent} (the folder is read-only)")


def _save_figures(figures: Mapping[str, Any], folder: Path) -> list[str]:
    names = []
    for name, fig in figures.items():
        fig.savefig(folder / f"{name}.png", dpi=120, bbox_inches="tight")
        fig.savefig(folder / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
        names += [f"{name}.png", f"{name}.svg"]
    return names


def run_experiment(
    experiment: str,
    config: str | os.PathLike | Mapping[str, Any],
    *,
    adapter: Any = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    tag: str | None = None,
    out_dir: str | os.PathLike = "outputs",
    overwrite: bool = False,
    parity: bool = True,
) -> Run:
    """Validate ``config``, run ``experiment`` and write ``out_dir/<experiment>/<tag>/``.

    Args:
        experiment: a registered name (``logit_lens``, ``causal_tracing``, ...).
        config: a YAML file or a mapping of the experiment's keys.
        adapter: an already-loaded model (its ``model`` key is then only recorded).
        model, device, dtype, tag: override the config's keys (``None`` keeps them).
        out_dir: the outputs root.
        overwrite: replace an existing run folder instead of refusing.
        parity: run :func:`oculi.experiments.parity.verify` on the run's prompt.

    Returns:
        A :class:`Run`.

    Raises:
        ConfigError: an unknown experiment, an invalid config (naming the key).
        FileExistsError: the run folder exists and ``overwrite`` is False.
    """
    from oculi.experiments.config import ConfigError

    exp_cls = get_experiment(experiment)
    cfg = load_config(config, exp_cls.Config, model=model, device=device, dtype=dtype, tag=tag)
    if cfg.experiment not in (None, experiment):
        raise ConfigError(f"experiment: the config is for {cfg.experiment!r}, not {experiment!r}")
    run_tag = cfg.tag or "default"
    cfg = cfg.model_copy(update={"experiment": experiment, "tag": run_tag})
    folder = run_folder(out_dir, experiment, run_tag)
    _check_free(folder, overwrite)

    if adapter is None:
        import oculi

        adapter = oculi.load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    started, t0 = now(), time.perf_counter()
    _seed_everything(cfg.seed)
    outcome = exp_cls().run(adapter, cfg)
    finished, elapsed = now(), time.perf_counter() - t0
    prov = provenance(adapter, seed=cfg.seed, model_id=cfg.model, direction=exp_cls.direction)
    prov.update(started_at=started, finished_at=finished, duration_s=round(elapsed, 3))
    if parity and outcome.prompt:
        from oculi.experiments.parity import verify

        prov["parity"] = verify(adapter, outcome.prompt).to_dict()
    return _write(folder, cfg, outcome, prov, overwrite)


def _write(folder: Path, cfg: Any, outcome: Any, prov: dict[str, Any], overwrite: bool) -> Run:
    import yaml

    from oculi.experiments.serialize import to_jsonable

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        resolved = cfg.model_dump(mode="json")
        (tmp / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        files = _save_figures(outcome.figures, tmp)
        result = {
            "experiment": cfg.experiment,
            "tag": cfg.tag,
            "result": to_jsonable(outcome.numbers),
            "config": resolved,
            "provenance": to_jsonable(prov),
            "files": ["result.json", "config.yaml", *files],
        }
        (tmp / "result.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        if folder.exists():
            _check_free(folder, overwrite)
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Run(folder, result)
