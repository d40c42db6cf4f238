"""``oculi.harvest``: the one call that turns prompts into a harvest store."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from oculi.capture.io.files import write_atomically
from oculi.errors import InputError, StorageRangeWarning, require_extra
from oculi.harvest.plan import STORAGE_DTYPES, HarvestConfig, HarvestPlan, make_plan
from oculi.harvest.prompts import Tokens, assign_splits, read_prompts, tokenize
from oculi.harvest.writer import FORMAT, StoreWriter

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


@dataclass(frozen=True)
class HarvestSummary:
    """What a harvest call did.

    Attributes:
        path: the store folder.
        n_prompts, tokens: prompts and tokens in the store (rows of every array).
        rows: rows per array, by ``"<site>/<layer>"``.
        bytes: bytes of array data in the store (uncompressed size).
        units, units_computed: work units in all, and computed by this call (the rest were
            already committed: a resumed run computes only what is missing).
        seconds: wall time of this call, planning included.
        tokens_per_s: tokens computed by this call per second of ``seconds``.

    Example::

        summary = oculi.harvest(adapter, "prompts.jsonl", sites=["resid_post"], layers=[6], out="acts")
        summary.tokens, summary.rows["resid_post/6"], summary.tokens_per_s
    """

    path: str
    n_prompts: int
    tokens: int
    rows: dict[str, int]
    bytes: int
    units: int
    units_computed: int
    seconds: float
    tokens_per_s: float


def harvest(
    adapter: Adapter,
    prompts: Any,
    *,
    sites: Sequence[str] | str,
    layers: Sequence[int] | int | None,
    out: str | Path,
    executor: Any = "local",
    batch_tokens: int = 8192,
    storage_dtype: torch.dtype | None = None,
    max_length: int | None = None,
    resume: bool = True,
    verify: bool = False,
    split: float | Sequence[str] = 0.0,
    seed: int = 0,
    compression: str | None = None,
    chunk_rows: int | None = None,
    unit_rows: int | None = None,
    text_field: str = "text",
    progress: bool = True,
    saes: Any = None,
) -> HarvestSummary:
    """Record ``sites`` x ``layers`` for every token of ``prompts`` into a store at ``out``.

    Example::

        summary = oculi.harvest(adapter, "prompts.jsonl", sites=["resid_post", "mlp_out"],
                                layers=range(0, 18), out="acts", batch_tokens=8192)
        store = oculi.open_harvest("acts")
        x = store["resid_post", 6][:1024]          # numpy [1024, d_model]

    Args:
        adapter: the model (its device runs the local executor).
        prompts: a list of strings, a JSONL file, or a dataset column (any iterable of
            strings, or of mappings with ``text_field``).
        sites: site kinds (see :data:`oculi.capture.SITE_KINDS`; not ``"pattern"``).
        layers: layer indices (negatives count from the end), ``None`` for all.
        out: the store folder (created; a matching store there is resumed).
        executor: ``"local"`` (default), ``"ray"``, or an executor instance
            (:class:`LocalExecutor`, :class:`RayExecutor` with its options).
        batch_tokens: token budget of one forward pass (batch size x longest prompt).
        storage_dtype: stored dtype (``torch.float32``/``float16``); default the model's
            dtype, fp32 for bf16 models (zarr has no bfloat16).
        max_length: keep the first ``max_length`` tokens of each prompt.
        resume: keep the committed units of a matching store at ``out`` and compute only the
            rest; ``False`` replaces the store there (only a folder with oculi's marker that
            holds nothing oculi did not write; anything else is refused, never deleted).
        verify: on resume, also read committed units back and compare their checksums.
        split: fraction of prompts held out as ``"test"`` in the index, or a label per prompt.
        seed: seed of the held-out choice.
        compression: ``None`` (raw) or ``"zstd"``.
        chunk_rows, unit_rows: override the row chunking and the rows per unit (= shard).
        text_field: the text's key in JSONL objects and dataset rows.
        progress: show a progress bar (local executor).
        saes: SAEs whose latents to store too (an :class:`oculi.sae.SAE`, a list, or a
            ``{name: sae}`` dict): SAE ``name`` (default its site) bound to layer ``l`` is
            the array ``store["sae.<name>", l]``, ``[n_tokens, d_sae]`` in the storage dtype,
            encoded from its site in the same forward pass (its site need not be in
            ``sites``; ``sites`` may then be empty).

    Returns:
        A :class:`HarvestSummary`.

    The store is locked for the whole call: a second harvest into it (resuming or not, any
    executor) is refused with the pid and host of the first.

    Raises:
        InputError: bad prompts, sites, layers or options (each named).
        HarvestStoreError: ``out`` holds a harvest of other prompts, model or config, is not
            an oculi store, or is being written by another harvest.
        FileWriteError: a write failed (full disk, file-size limit); names the file.

    Warns:
        StorageRangeWarning: values beyond a float16 storage dtype's range were stored as
            inf; names the arrays.
    """
    t0 = time.perf_counter()
    require_extra("zarr", "store")
    require_extra("pyarrow", "store")
    named = _named_saes(adapter, saes)
    config = _config(adapter, sites, layers, batch_tokens, storage_dtype, max_length, split,
                     seed, compression, chunk_rows, unit_rows, named)  # fmt: skip
    texts = read_prompts(prompts, text_field=text_field)
    tokens = tokenize(
        adapter.tokenizer, texts, max_length=max_length, max_positions=adapter.max_positions
    )
    labels = assign_splits(tokens.n_prompts, split, seed)
    plan = make_plan(adapter, config, tokens, [sae for _, sae in named])
    runner = _executor(executor, progress)
    with StoreWriter.create_or_resume(
        out,
        plan,
        manifest(adapter, plan, tokens),
        lambda path: write_index(path, tokens, labels),
        resume=resume,
        verify=verify,
    ) as writer:  # holds the store's lock until the last unit is committed
        units = writer.pending()
        if units:
            runner.run(adapter, plan, tokens, units, writer)
        overflow = writer.overflow()
    if overflow:
        warn_overflow(overflow, plan.config.storage_dtype)
    seconds = time.perf_counter() - t0
    computed = sum(u.rows for u in units)
    return HarvestSummary(
        path=str(Path(out)),
        n_prompts=tokens.n_prompts,
        tokens=tokens.n_tokens,
        rows={a.name: tokens.n_tokens for a in plan.arrays},
        bytes=tokens.n_tokens * sum(a.width for a in plan.arrays) * plan.itemsize,
        units=plan.n_units,
        units_computed=len(units),
        seconds=seconds,
        tokens_per_s=computed / seconds if seconds > 0 else 0.0,
    )


def _named_saes(adapter: Adapter, saes: Any) -> list[tuple[str, Any]]:
    """``[(name, sae)]`` of the ``saes=`` argument, each SAE checked against the model and
    bound to its resolved layer (a copy when the layer was negative)."""
    if saes is None:
        return []
    from oculi.sae.model import SAE

    if isinstance(saes, SAE):
        saes = [saes]
    items = list(saes.items()) if isinstance(saes, dict) else [(None, s) for s in saes]
    out: list[tuple[str, Any]] = []
    for name, sae in items:
        if not isinstance(sae, SAE):
            raise InputError(f"saes takes oculi.sae.SAE objects, got {type(sae).__name__}")
        layer, _site, _ = sae.check_model(adapter, "harvest(saes=...)")
        if layer != sae.layer:
            sae = copy.copy(sae)
            sae.layer = layer
        out.append((str(name) if name is not None else str(sae.site), sae))
    keys = [(name, sae.layer) for name, sae in out]
    if len(set(keys)) != len(keys):
        raise InputError(
            f"two SAEs would be stored as the same array {sorted(keys)}; name them: "
            "saes={'a': sae1, 'b': sae2}"
        )
    return out


def sae_fingerprint(sae: Any) -> str:
    """A hash of an SAE's kind, binding and weights (stored in the manifest)."""
    h = hashlib.sha256(f"{sae.kind}|{sae.k}|{sae.site}|{sae.write_site}|{sae.layer}".encode())
    for key, t in sorted(sae.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _config(adapter, sites, layers, batch_tokens, storage_dtype, max_length, split, seed,
            compression, chunk_rows, unit_rows, named=()) -> HarvestConfig:  # fmt: skip
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    resolved = adapter.resolve_layers(None if layers is None else list(layers))
    dtype = storage_dtype or adapter.dtype
    if dtype == torch.bfloat16 and storage_dtype is None:
        dtype = torch.float32
    if dtype not in STORAGE_DTYPES:
        raise InputError(
            f"storage_dtype {dtype} cannot be stored; use torch.float32 or torch.float16 "
            "(zarr has no bfloat16)"
        )
    return HarvestConfig(
        sites=sites,
        layers=tuple(sorted(resolved)),
        batch_tokens=batch_tokens,
        storage_dtype=STORAGE_DTYPES[dtype],
        compression=compression,  # type: ignore[arg-type]
        chunk_rows=chunk_rows,
        unit_rows=unit_rows,
        split=_split_key(split),
        seed=seed,
        max_length=max_length,
        saes=tuple((name, sae_fingerprint(sae)) for name, sae in named),
    )


def _split_key(split: float | Sequence[str]) -> float | str:
    """The manifest's record of ``split``: the fraction, or a hash of per-prompt labels."""
    if isinstance(split, (int, float)) and not isinstance(split, bool):
        return float(split)
    if isinstance(split, str):
        raise InputError(f"split must be a fraction or one label per prompt, got {split!r}")
    blob = json.dumps([str(s) for s in cast(Sequence[str], split)]).encode()
    return "labels:" + hashlib.sha256(blob).hexdigest()[:16]


def _executor(executor: Any, progress: bool):
    from oculi.harvest.local import LocalExecutor

    if executor == "local":
        return LocalExecutor(progress=progress)
    if executor == "ray":
        from oculi.harvest.distributed import RayExecutor

        return RayExecutor()
    if hasattr(executor, "run"):
        return executor
    raise InputError(f"executor must be 'local', 'ray' or an executor instance, got {executor!r}")


def model_identity(adapter: Adapter) -> dict[str, Any]:
    """What must match for two harvests to be the same model (compared on resume)."""
    cfg = cast(Any, adapter.model).config.to_dict()
    # not the model's identity: where it was loaded from, versions, dtype (compared apart), and
    # "architectures", which save_pretrained fills in on the live config
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        cfg.pop(key, None)
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return {
        "class": type(adapter.model).__name__,
        "family": adapter.anatomy.family,
        "config_sha256": hashlib.sha256(blob).hexdigest(),
        "n_params": sum(p.numel() for p in adapter.model.parameters()),
        "dtype": str(adapter.dtype).removeprefix("torch."),
    }


def manifest(adapter: Adapter, plan: HarvestPlan, tokens: Tokens) -> dict[str, Any]:
    """The manifest of a new store (JSON-normalised, so it compares equal once read back)."""
    import pyarrow
    import transformers
    import zarr

    import oculi

    data = {
        "format": FORMAT,
        "config": {
            **plan.config.to_json(),
            "chunk_rows": plan.chunk_rows,
            "unit_rows": plan.unit_rows,
            "arrays": [vars(a) | {"name": a.name} for a in plan.arrays],
        },
        "model": model_identity(adapter),
        "tokens": {
            "sha256": tokens.fingerprint(),
            "n_prompts": tokens.n_prompts,
            "n_tokens": tokens.n_tokens,
        },
        "provenance": {
            "model_source": getattr(adapter.model, "name_or_path", None),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "versions": {
                "oculi": oculi.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "zarr": zarr.__version__,
                "pyarrow": pyarrow.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        },
    }
    return json.loads(json.dumps(data))


def write_index(path: Path, tokens: Tokens, labels: np.ndarray) -> None:
    """The Parquet index: one row per token, in store row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = np.diff(tokens.offsets)
    prompt_id = np.repeat(np.arange(tokens.n_prompts, dtype=np.int64), lengths)
    position = (np.arange(tokens.n_tokens) - np.repeat(tokens.offsets[:-1], lengths)).astype(
        np.int32
    )
    names = sorted(set(labels.tolist()))
    codes = {name: i for i, name in enumerate(names)}
    split_codes = np.repeat(np.array([codes[s] for s in labels], dtype=np.int32), lengths)
    table = pa.table(
        {
            "prompt_id": pa.array(prompt_id),
            "position": pa.array(position),
            "token_id": pa.array(tokens.ids.astype(np.int32)),
            "split": pa.DictionaryArray.from_arrays(pa.array(split_codes), pa.array(names)),
        }
    )
    write_atomically(path, lambda tmp: pq.write_table(table, tmp, row_group_size=1 << 20),
                     overwrite=True, what="the harvest index")  # fmt: skip


def warn_overflow(overflow: dict[str, tuple[float, list[int]]], dtype: str) -> None:
    """One :class:`StorageRangeWarning` naming the arrays that hold values stored as inf."""
    limit = float(np.finfo(dtype).max)
    arrays = "; ".join(
        f"{name!r} (|values| up to {peak:.4g}, units {units[:8]}{'...' if len(units) > 8 else ''})"
        for name, (peak, units) in overflow.items()
    )
    warnings.warn(
        f"values beyond the range of {dtype} (max {limit:.4g}) were stored as inf in {arrays}; "
        "harvest these sites in float32 (storage_dtype=torch.float32)",
        StorageRangeWarning,
        stacklevel=3,
    )
