"""Helpers shared by the patching sweeps (activation, path, tracing, attribution).

Prompt checks, the metric on recorded runs, the batched evaluation of patched rows, the
grouping of position patches by where their copies can start, and the progress bar.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from oculi.capture.inputs import Batch
from oculi.errors import InputError
from oculi.patching.metrics import Metric
from oculi.patching.resume import ResumableRun, unembed
from oculi.patching.writers import PatchSpec, offset_index, patchers_for

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


Strategy = Literal["auto", "layered", "fused"]


def choose_strategy(strategy: Strategy, device: torch.device | str) -> Literal["layered", "fused"]:
    """The batching strategy of a sweep: ``strategy`` itself, or for ``"auto"`` the one that
    suits ``device``.

    ``"layered"`` runs each layer's patched copies from that layer on, one batch per layer:
    the fewest FLOPs, which is what a CPU's time follows. ``"fused"`` joins all layers' copies
    into one forward that grows layer by layer: a few more FLOPs but ``L`` layer calls instead
    of ``L²/2``, which is what an accelerator's time follows (kernel launches, not arithmetic,
    dominate a sweep's small batches there). Both give the same numbers.

    Example:
        >>> choose_strategy("auto", "cuda:0"), choose_strategy("auto", "cpu")
        ('fused', 'layered')
    """
    if strategy not in ("auto", "layered", "fused"):
        raise InputError(f"strategy must be 'auto', 'layered' or 'fused', got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "layered" if torch.device(device).type == "cpu" else "fused"


def single_prompt(adapter: Adapter, prompt: Any, what: str) -> Batch:
    """``prompt`` prepared as a one-row batch; refuses batches and BOS-only prompts."""
    batch = adapter.prepare(prompt)
    if batch.input_ids.shape[0] != 1:
        raise InputError(
            f"{what} must be one prompt (a string or [1, T] ids), got a batch of {batch.input_ids.shape[0]}"
        )
    bos = getattr(adapter.tokenizer, "bos_token_id", None)
    real = batch.input_ids[0][batch.attention_mask[0].bool()]
    if bos is not None and bool((real == bos).all()):
        raise InputError(
            f"{what} prompt is empty after tokenization: only the BOS token {real.tolist()}; "
            "a next-token metric needs at least one token of content"
        )
    return batch


def prompt_tokens(adapter: Adapter, batch: Batch) -> list[str]:
    """The tokens of a one-prompt batch (see :func:`single_prompt`) as strings, ``[]`` without
    a tokenizer."""
    if adapter.tokenizer is None:
        return []
    # one row, so to_str_tokens returns a single list of tokens rather than a list per row
    return cast("list[str]", adapter.to_str_tokens(batch.input_ids))


def check_read_position(metric: Metric, batch: Batch, what: str) -> None:
    """The metric's position (relative to the real tokens) must exist in ``batch``'s row 0."""
    n = int(batch.attention_mask[0].sum())
    if not -n <= metric.position < n:
        raise IndexError(
            f"{metric.name}: position {metric.position} out of range for the {what} prompt of "
            f"{n} tokens (valid positions 0..{n - 1}, or -{n}..-1 from the end)"
        )


def check_aligned(adapter: Adapter, clean: Batch, corrupt: Batch) -> None:
    """Position-aligned patching needs prompts of equal token length."""
    tc, tk = clean.input_ids.shape[1], corrupt.input_ids.shape[1]
    if tc != tk:
        bos = getattr(adapter.tokenizer, "bos_token_id", None)
        first = (int(clean.input_ids[0, 0]), int(corrupt.input_ids[0, 0]))
        hint = (
            " (BOS added to one?)"
            if bos is not None and (first[0] == bos) != (first[1] == bos)
            else ""
        )
        raise InputError(
            f"clean has {tc} tokens, corrupt has {tk}{hint}; position-aligned patching needs "
            "prompts of the same token length"
        )


_LOGIT_BLOCK = 32 * 2**20  # logits (floats) computed at once when a metric reads all V


def evaluate(adapter: Adapter, metric: Metric, normed: torch.Tensor) -> torch.Tensor:
    """``metric`` of final-normed residual rows ``[N, d]``, ``[N]`` (float32, on the CPU).

    Sweeps collect the rows of all their patched copies and evaluate them here once: a metric
    that reads the whole vocabulary (probability, KL) then streams the ``[V, d]`` unembedding
    a few times in all instead of once per batch of copies. The blocks stay on the device and
    are moved to the CPU in one copy at the end.
    """
    cols = metric.columns()
    width = adapter.d_vocab if cols is None else len(cols)
    step = max(1, _LOGIT_BLOCK // width)
    parts = [
        metric(unembed(adapter, normed[i : i + step], cols)).float()
        for i in range(0, normed.shape[0], step)
    ]
    return torch.cat(parts).cpu() if parts else torch.empty(0)


def final_normed(run: ResumableRun, position: int) -> torch.Tensor:
    """The unpatched run's final-normed residual at ``position``, ``[1, d]``."""
    n = run.adapter.n_layers
    return run.run_from(n, run.resid[-1:], positions=[position])[:, 0]


def metric_of(adapter: Adapter, run: ResumableRun, metric: Metric) -> float:
    """The metric on an unpatched recorded run."""
    normed = final_normed(run, run.position(metric.position))
    return float(metric(unembed(adapter, normed, metric.columns()))[0])


def with_reference(metric: Metric, logits: torch.Tensor) -> Metric:
    """A KL metric bound to the reference distribution of ``logits [V]``."""
    return replace(metric, reference=torch.log_softmax(logits.float(), dim=-1))


def recorded_pair(
    adapter: Adapter, clean: Batch, corrupt: Batch, metric: Metric
) -> tuple[ResumableRun, ResumableRun, Metric, float, float]:
    """Both prompts recorded once: ``(clean run, corrupt run, metric, clean value, corrupt
    value)``, a KL metric bound to the clean run's distribution at its read position."""
    clean_run, corrupt_run = ResumableRun(adapter, clean), ResumableRun(adapter, corrupt)
    if metric.kind == "kl":
        normed = final_normed(clean_run, clean_run.position(metric.position))
        metric = with_reference(metric, unembed(adapter, normed, None)[0])
    clean_value = metric_of(adapter, clean_run, metric)
    corrupt_value = metric_of(adapter, corrupt_run, metric)
    return clean_run, corrupt_run, metric, clean_value, corrupt_value


def chunks(items: list, size: int) -> list[list]:
    """``items`` cut into consecutive lists of at most ``size``."""
    return [items[i : i + size] for i in range(0, len(items), size)]


_MIN_SAVED = 16


def position_groups(
    live: list[tuple[int, int]], t: int, batch_size: int | None
) -> list[tuple[int, list[tuple[int, int]]]]:
    """Batches of position patches ``(column, position)``, each run from its earliest position.

    Copies patched at position ``p`` equal the corrupt run before ``p``, so a batch whose
    earliest patch is at ``s`` runs positions ``s..T-1`` only. A new batch starts when the
    next position would run on less than half of the current batch's length and starting
    there saves at least ``_MIN_SAVED`` positions per copy (below that, an extra batch costs
    more in per-call overhead than the positions it skips: on a 15-token prompt one batch
    is fastest), or when the batch is full.
    """
    groups: list[tuple[int, list[tuple[int, int]]]] = []
    for col, p in sorted(live, key=lambda cp: cp[1]):
        if groups:
            start, chunk = groups[-1]
            full = batch_size is not None and len(chunk) >= batch_size
            if not full and (2 * (t - p) >= t - start or p - start < _MIN_SAVED):
                chunk.append((col, p))
                continue
        groups.append((p, [(col, p)]))
    return groups


def run_patched(
    adapter: Adapter,
    run: ResumableRun,
    site: str,
    layer: int,
    clean: torch.Tensor,
    specs: list[PatchSpec],
    read_pos: int,
    start: int = 0,
) -> torch.Tensor:
    """Final-normed residual at ``read_pos`` of ``len(specs)`` patched copies, ``[P, d]``.

    With ``start``, every spec patches a position ``>= start`` and the copies run positions
    ``start..T-1`` only, on the recorded run's keys and values before ``start``.
    """
    n = len(specs)
    if site == "resid_pre" or (site == "resid_post" and layer + 1 < adapter.n_layers):
        first = layer if site == "resid_pre" else layer + 1
        hidden = run.resid[first, start:].unsqueeze(0).expand(n, -1, -1).clone()
        for s in specs:
            at, src = offset_index(s.position, start)
            hidden[s.row, at] = clean[src]
        return run.run_from(first, hidden, positions=[read_pos], start=start)[:, 0]
    patchers = patchers_for(adapter, site, layer, clean, specs, run.resid[layer], start)
    begin = run.resid[layer, start:].unsqueeze(0).expand(n, -1, -1)
    return run.run_from(layer, begin, patchers=patchers, positions=[read_pos], start=start)[:, 0]


def patched_copies(
    base: torch.Tensor, clean: torch.Tensor, items: list, start: int = 0
) -> torch.Tensor:
    """Copies of ``base [T - start, d]`` with ``clean [T, d]`` written at one position each
    (``items``; ``[None]``: one copy that is all of ``clean``), ``[n, T - start, d]``, in one
    indexed write whatever ``n``."""
    if items == [None]:
        return clean[start:].unsqueeze(0).to(base.dtype)
    n = len(items)
    pos = to_device(items, base.device)
    hidden = base.unsqueeze(0).expand(n, -1, -1).clone()
    hidden[torch.arange(n, device=base.device), pos - start] = clean[pos].to(hidden.dtype)
    return hidden


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on ``device`` without waiting for the device's queue (a plain
    ``torch.tensor(..., device="cuda")`` synchronises the host with the stream)."""
    return torch.tensor(values).to(device, non_blocking=True)


class _NoBar:
    def update(self, _n: int) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar of ``total`` steps, or a silent stand-in when ``enabled`` is false."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
