"""What a result needs to be trusted later: versions, the exact model, the machine's choices.

::

    prov = provenance(adapter, seed=0, model_id="gemma-3-270m")
    prov["torch_version"], prov["model"]["weights_sha256"], prov["git_sha"]
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_HASHES: dict[tuple[str, int, int], str] = {}


def now() -> str:
    """The current UTC time, ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat()


def git_sha(folder: str | os.PathLike) -> str | None:
    """The commit checked out in the git repository holding ``folder`` (``+dirty`` when
    tracked files differ), or ``None`` outside a repository or without git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def weights_sha256(adapter: Any) -> tuple[str, str]:
    """``(sha256, what was hashed)``: the weight files of a local model folder, or, for a model
    without local files (built in memory, or a hub id whose files are elsewhere), the loaded
    parameters themselves."""
    source = str(getattr(adapter.model.config, "name_or_path", "") or "")
    folder = Path(source).expanduser() if source else None
    files = []
    if folder is not None and folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    elif folder is not None and folder.is_file():
        files = [folder]
    if files:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
        return h.hexdigest(), "files: " + ", ".join(p.name for p in files)
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(adapter.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest(), "loaded parameters (state_dict)"


def model_identity(adapter: Any, model_id: str | None = None) -> dict[str, Any]:
    """The model as named by the user, where it was loaded from, its revision and hash."""
    from oculi.models.loading import read_marker

    cfg = adapter.model.config
    sha, hashed = weights_sha256(adapter)
    source = str(getattr(cfg, "name_or_path", "") or "")
    marker = read_marker(source) if source and Path(source).is_dir() else None
    return {
        "id": model_id or str(getattr(cfg, "name_or_path", "")),
        "name_or_path": str(getattr(cfg, "name_or_path", "")),
        "revision": getattr(cfg, "_commit_hash", None),
        "weights_sha256": sha,
        "weights_hashed": hashed,
        # a folder oculi converted (the embedded default): the file it was built from
        "converted_from": (
            {"file": marker.get("source"), "sha256": marker.get("source_sha256")}
            if marker
            else None
        ),
        "class": type(adapter.model).__name__,
        "family": adapter.anatomy.family,
        "n_layers": adapter.n_layers,
        "n_heads": adapter.n_heads,
        "d_model": adapter.d_model,
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
    }


def provenance(
    adapter: Any, *, seed: int, model_id: str | None = None, direction: str | None = None
) -> dict[str, Any]:
    """Versions, model identity, device, dtype, seed, padding side, patching direction, git."""
    import torch
    import transformers

    import oculi

    oculi_src = Path(oculi.__file__).resolve().parent
    return {
        "oculi_version": oculi.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "model": model_identity(adapter, model_id),
        "device": str(adapter.device),
        "dtype": str(adapter.dtype).removeprefix("torch."),
        "seed": seed,
        "padding_side": getattr(adapter.tokenizer, "padding_side", None),
        "patching_direction": direction,
        "git_sha": git_sha(Path.cwd()),
        "oculi_git_sha": git_sha(oculi_src),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }
