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
    """A finished run: its folder and the content of its ``result.json``.

    ::

        run = run_experiment("logit_lens", "configs/logit_lens.yaml")
        run.folder                     # outputs/logit_lens/default
        run.result["numbers"]
    """

    folder: Path
    result: dict[str, Any]


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# a tag is one folder name; the file system allows 255 bytes, and the temporary folder a run
# is written to adds its own suffix
MAX_TAG_BYTES = 200


def run_folder(out_dir: str | os.PathLike, experiment: str, tag: str) -> Path:
    """``out_dir/experiment/tag``, with ``~`` expanded; the tag must be a plain name of at
    most :data:`MAX_TAG_BYTES` bytes (UTF-8)."""
    from oculi.errors import brief
    from oculi.experiments.config import ConfigError

    if not tag or tag in (".", "..") or any(c in tag for c in "/\\\0"):
        raise ConfigError(f"tag {brief(tag, 60)} must be a plain folder name (no slashes)")
    size = len(tag.encode("utf-8", "surrogatepass"))
    if size > MAX_TAG_BYTES:
        raise ConfigError(
            f"tag {brief(tag, 60)} is {size} bytes long; a tag is a folder name of 1 to "
            f"{MAX_TAG_BYTES} bytes"
        )
    return Path(out_dir).expanduser() / experiment / tag


def _check_free(folder: Path, overwrite: bool) -> None:
    """Refuse, before any computation, a run folder that cannot be (re)placed."""
    if folder.is_symlink():
        raise FileExistsError(
            f"{folder} is a symbolic link; oculi writes a run only into a folder of its own "
            "(remove the link or choose another --tag)"
        )
    if folder.exists() and not overwrite:
        raise FileExistsError(
            f"{folder} already holds a run; choose another --tag, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    if folder.exists() and not (folder.is_dir() and (folder / "result.json").is_file()):
        raise FileExistsError(
            f"{folder} is not an oculi run folder (no result.json); oculi replaces only its "
            "own runs, never another folder or file: choose another --tag or --out"
        )
    parent = folder.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"cannot write a run under {parent}: it is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"cannot write a run under {parent} (the folder is read-only)")


def _save_figures(figures: Mapping[str, Any], folder: Path) -> list[str]:
    from oculi.visualize._common import save_figure

    names = []
    for name, fig in figures.items():
        save_figure(fig, folder / f"{name}.png", dpi=120, bbox_inches="tight")
        save_figure(fig, folder / f"{name}.svg", bbox_inches="tight", metadata={"Date": None})
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

    Example::

        run = run_experiment("logit_lens", {"prompt": "The Eiffel Tower is in"}, tag="first")
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
    """Write the run into a temporary folder beside ``folder`` (each file whole and flushed),
    then rename it into place; an old run being replaced is moved aside first and removed only
    once the new one is in place, so a failure at any point leaves the old run or the new one."""
    import yaml

    from oculi.capture.io.files import fsync_folder, write_text
    from oculi.errors import FileWriteError
    from oculi.experiments.serialize import to_jsonable

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    for stale in (tmp, old):  # left by a crashed run of this very process id
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
    tmp.mkdir()
    try:
        resolved = cfg.model_dump(mode="json")
        write_text(tmp / "config.yaml", yaml.safe_dump(resolved, sort_keys=False), what="config")
        files = _save_figures(outcome.figures, tmp)
        result = {
            "experiment": cfg.experiment,
            "tag": cfg.tag,
            "result": to_jsonable(outcome.numbers),
            "config": resolved,
            "provenance": to_jsonable(prov),
            "files": ["result.json", "config.yaml", *files],
        }
        text = json.dumps(result, indent=2, ensure_ascii=False)
        write_text(tmp / "result.json", text, what="the run's result")
        fsync_folder(tmp)
        if folder.exists() or folder.is_symlink():
            _check_free(folder, overwrite)
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if old.exists() and not folder.exists():
                os.rename(old, folder)  # the old run back in place
            raise
        fsync_folder(folder.parent)
    except OSError as exc:
        why = getattr(exc, "reason", None) or exc.strerror or str(exc)
        kept = "the previous run is kept" if folder.is_dir() else "nothing was written"
        raise FileWriteError(f"cannot write the run folder {folder}: {why} ({kept})") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and folder.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return Run(folder, result)
