"""Training checkpoints: everything a run needs to continue bit for bit, in one safetensors file.

A checkpoint holds the parameters, the optimiser's moments and step counts, the dead-latent
counters, the input scales, and (JSON in the header) the run's configuration, how far it got
(step, epoch, batches served in that epoch, tokens) and the history so far. It is written
atomically (:func:`oculi.capture.io.files.write_atomically`), so a run killed at any moment
leaves either the previous checkpoint or the new one, never half of one. Resuming restores
all of it and skips the batches already served in the current epoch of the same seeded order,
so the resumed run sees exactly the data, and ends with exactly the weights, of a run that
never stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from oculi.capture.io.files import write_atomically
from oculi.sae.io import SAEFormatError

FORMAT = "oculi.sae.checkpoint"


def save_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    params: list[str],
    state: dict[str, Any],
) -> None:
    """Write ``tensors`` (parameters, counters), the optimiser's state and ``state`` (JSON)."""
    from safetensors.torch import save_file

    out = {f"t.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    opt = optimizer.state_dict()
    for i, name in enumerate(params):
        for key, value in opt["state"].get(i, {}).items():
            out[f"opt.{name}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    header = {"format": FORMAT, "state": json.dumps(state, sort_keys=True)}
    write_atomically(path, lambda tmp: save_file(out, str(tmp), metadata=header),
                     overwrite=True, what="the training checkpoint")  # fmt: skip


def load_checkpoint(
    path: Path, optimizer: torch.optim.Optimizer, params: list[str], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` of a checkpoint; the optimiser's state is loaded into it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt", device="cpu") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise SAEFormatError(f"{str(path)!r} is not an oculi SAE training checkpoint")
    raw = load_file(str(path), device=str(device))
    tensors = {k[2:]: v for k, v in raw.items() if k.startswith("t.")}
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for i, name in enumerate(params):
        prefix = f"opt.{name}."
        entry = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
        if entry:
            if "step" in entry:
                entry["step"] = entry["step"].cpu()  # Adam keeps its step count on the CPU
            opt_state[i] = entry
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": opt_state, "param_groups": current["param_groups"]})
    return tensors, json.loads(header["state"])
