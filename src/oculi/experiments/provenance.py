"""What a result needs to be trusted later: versions, the exact model, the machine's choices.

::

    prov = provenance(adapter, seed=0, model_id="gemma-3-270m")
    prov["torch_version"], prov["model"]["weights_sha256"], prov["git_sha"]
    prov["model"]["params_sha256"]        # the weights as they are in memory now
    prov["model"]["weights_match_files"]  # False: modified in memory since loaded

``weights_sha256`` hashes the weight files the model was loaded from (which checkpoint was
named); ``params_sha256`` hashes the parameters in memory (what produced the numbers); a model
changed after loading keeps the first and changes the second, and ``weights_match_files``
(compared tensor by tensor, ``weights_differ_from_files`` naming the first that differ) says so.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from oculi.capture.interrupts import no_grad

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


def weight_files(adapter: Any) -> list[Path]:
    """The weight files of a model loaded from a local folder or file (empty otherwise)."""
    source = str(getattr(adapter.model.config, "name_or_path", "") or "")
    folder = Path(source).expanduser() if source else None
    if folder is not None and folder.is_dir():
        return sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if folder is not None and folder.is_file():
        return [folder]
    return []


def weights_sha256(adapter: Any) -> tuple[str, str]:
    """``(sha256, what was hashed)``: the weight files of a local model folder, or, for a model
    without local files (built in memory, or a hub id whose files are elsewhere), the loaded
    parameters themselves (:func:`params_sha256`). The files say which checkpoint was named,
    not what is in memory now: :func:`model_identity` records both."""
    files = weight_files(adapter)
    if files:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}:{file_sha256(p)}\n".encode())
        return h.hexdigest(), "files: " + ", ".join(p.name for p in files)
    return params_sha256(adapter.model), "loaded parameters (state_dict)"


def _unique_state(model: Any) -> list[tuple[str, Any, str | None]]:
    """``(name, tensor, tied_to)`` for each ``state_dict`` entry in name order; ``tied_to``
    names the first entry sharing its memory (a tied unembedding), else ``None``."""
    out: list[tuple[str, Any, str | None]] = []
    first: dict[tuple, str] = {}
    # transformers' own record of tied parameters ({"lm_head.weight": "model.embed_tokens.weight"}
    # where the config ties them): offloaded placeholders and disk loads share no memory
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    group = {k: ("tied", v) for k, v in ties.items()} | {v: ("tied", v) for v in ties.values()}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        t = tensor.detach()
        keys: list[tuple] = [group[name]] if name in group else []
        offloaded = t.device.type == "meta"
        if offloaded:  # read from the hook that holds it
            keys.append(("meta", id(tensor)))
            t = _offloaded_value(model, name)
        keys.append((t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())))
        # tensors in memory are tied only where they share memory (a user may have untied them)
        found = [first[k] for k in (keys if offloaded else keys[-1:]) if k in first]
        tied = found[0] if found and t.numel() else None
        for key in keys:
            first.setdefault(key, name)
        out.append((name, t, tied))
    return out


def _offloaded_value(model: Any, name: str) -> Any:
    """The values of the ``meta`` placeholder ``name``, from its accelerate offload hook (read
    as :func:`oculi.models.weights.read_bias` reads any parameter), so an offloaded model
    hashes as the same weights in memory do."""
    from oculi.models.weights import read_bias

    module_name, _, attr = name.rpartition(".")
    value = read_bias(model.get_submodule(module_name), attr)
    if value is None:
        raise ValueError(f"{name} is on the meta device and no offload hook holds its values")
    return value


def params_sha256(model: Any) -> str:
    """SHA-256 of the weights as they are in memory now.

    Every ``state_dict`` entry (parameters and persistent buffers) is hashed on its own
    (SHA-256 of its raw bytes, in threads: hashlib releases the GIL); the result is the SHA-256
    of one line per entry, in name order: ``name:dtype:shape:digest``. A tensor tied under a
    second name (a tied unembedding) gives ``name:dtype:shape:=tied:first_name`` instead. One
    pass over the weights: about 1 s per core for Gemma 3 270M's 268M float32 parameters,
    so it runs once per run.
    """
    import torch

    entries = _unique_state(model)

    def digest(t: Any) -> str:
        with no_grad():
            data = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        return hashlib.sha256(data.numpy()).hexdigest()

    todo = [t for _, t, tied in entries if tied is None]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = iter(list(pool.map(digest, todo)))
    h = hashlib.sha256()
    for name, t, tied in entries:
        tail = f"=tied:{tied}" if tied is not None else next(digests)
        h.update(f"{name}:{str(t.dtype).removeprefix('torch.')}:{list(t.shape)}:{tail}\n".encode())
    return h.hexdigest()


def _file_tensors(path: Path) -> Any:
    """``(name, tensor)`` pairs of one weight file (read lazily where the format allows)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield key, f.get_tensor(key)
        return
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    yield from state.items()


def compare_with_files(adapter: Any, limit: int = 20) -> dict[str, Any]:
    """Whether the weights in memory equal those in the model's weight files.

    Each file tensor is matched to the ``state_dict`` entry of the same name (also with or
    without the model's ``base_model_prefix``), cast to its dtype and compared exactly, one
    tensor at a time. Entries tied to a compared one count as compared.

    Returns:
        ``{"match": True/False/None, "differ": [names, at most limit], "n_differ": int,
        "note": str}``. ``match`` is ``None`` where nothing could be compared: no local
        files, or files of a format oculi does not read back (GGUF is dequantised on load).
    """
    import torch

    files = weight_files(adapter)
    readable = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    if not files or len(readable) != len(files):
        why = "no local weight files" if not files else "weight files oculi does not read back"
        return {"match": None, "differ": [], "n_differ": 0, "note": f"not compared: {why}"}
    entries = _unique_state(adapter.model)
    state = {name: t for name, t, _ in entries}
    prefix = str(getattr(adapter.model, "base_model_prefix", "") or "")
    compared: set[str] = set()
    differ: list[str] = []
    with no_grad():
        for path in readable:
            for key, loaded in _file_tensors(path):
                name = _match_name(key, state, prefix)
                if name is None:
                    continue  # a file tensor the model does not use
                compared.add(name)
                mine = state[name]
                same = tuple(loaded.shape) == tuple(mine.shape) and torch.equal(
                    loaded.to(mine.dtype), mine.cpu()
                )
                if not same:
                    differ.append(name)
    root = {name: tied or name for name, _, tied in entries}  # tied names share one root
    covered = {root[n] for n in compared}
    missing = [n for n, _, _ in entries if root[n] not in covered]
    bad = sorted(differ) + [f"{n} (not in the files)" for n in missing]
    if not bad:
        note = "the weights in memory equal the weight files"
    else:
        note = (
            f"the weights in memory differ from the weight files in {len(bad)} tensor(s): "
            "results are of the model as modified in memory (params_sha256), not of the files "
            "(weights_sha256)"
        )
    return {"match": not bad, "differ": bad[:limit], "n_differ": len(bad), "note": note}


def _match_name(key: str, state: dict[str, Any], prefix: str) -> str | None:
    if key in state:
        return key
    if prefix and f"{prefix}.{key}" in state:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in state:
        return key[len(prefix) + 1 :]
    return None


def model_identity(adapter: Any, model_id: str | None = None) -> dict[str, Any]:
    """The model as named by the user, where it was loaded from, its revision and hash."""
    from oculi.models.loading import read_marker

    cfg = adapter.model.config
    in_memory = params_sha256(adapter.model)
    files = weight_files(adapter)
    sha, hashed = (
        weights_sha256(adapter) if files else (in_memory, "loaded parameters (state_dict)")
    )
    check = compare_with_files(adapter)
    source = str(getattr(cfg, "name_or_path", "") or "")
    marker = read_marker(source) if source and Path(source).is_dir() else None
    return {
        "id": model_id or str(getattr(cfg, "name_or_path", "")),
        "name_or_path": str(getattr(cfg, "name_or_path", "")),
        "revision": getattr(cfg, "_commit_hash", None),
        "weights_sha256": sha,
        "weights_hashed": hashed,
        # the weights as they are in memory, and whether they still equal the files
        "params_sha256": in_memory,
        "weights_match_files": check["match"],
        "weights_differ_from_files": check["differ"],
        "weights_note": check["note"],
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
