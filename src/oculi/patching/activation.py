"""Activation patching: which activations carry the difference between two prompts?

Run a *clean* prompt (the model does the task: "...John gave a drink to" → " Mary") and a
*corrupt* one that differs minimally (the second name swapped). For each site — a layer, a
position, maybe a head — copy the clean activation into the corrupt run and measure how much
of the clean behaviour comes back. ``values[l, p]`` is the metric of the corrupt run with the
clean activation patched in at layer ``l`` (and position ``p``, or head ``h``);
:meth:`PatchingResult.normalized` maps it to recovery, ``(patched − corrupt) / (clean −
corrupt)``: 0 where the patch does nothing, 1 where it restores the clean run.

How it stays fast: both prompts run once. Every patched copy starts from the corrupt run's
input to the patched layer (earlier layers cannot change), the copies of one layer run as one
batch through the remaining layers only, and the unembedding is applied at the metric's
position to the vocabulary rows the metric reads (two rows for a logit difference).

::

    from oculi import patching
    res = patching.activation_patching(adapter, clean, corrupt, site="resid_pre",
                                       metric=patching.logit_diff(" Mary", " John"))
    res.values          # [n_layers, T]
    res.normalized()    # recovery
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from oculi.capture.engine import record
from oculi.capture.inputs import Batch
from oculi.capture.sites import PER_HEAD, WRITABLE
from oculi.errors import InputError
from oculi.patching.metrics import Metric
from oculi.patching.resume import ResumableRun, unembed
from oculi.patching.writers import PatchSpec, check_patchable, offset_index, patchers_for
from oculi.viz import heatmap, text_grid

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

PATCHABLE = WRITABLE


@dataclass
class PatchingResult:
    """The outcome of a patching sweep.

    Attributes:
        values: metric with each patch, ``[n_layers, T]``, ``[n_layers, n_heads]`` or
            ``[n_layers]``.
        clean_metric, corrupt_metric: the metric on the unpatched clean and corrupt runs.
        layers: model layers of the first axis.
        axis: what the second axis indexes: ``"position"``, ``"head"`` or ``None``.
        site, metric: what was patched and measured.
        tokens: the corrupt prompt's tokens (for labelling heatmaps), if a tokenizer is known.
    """

    values: torch.Tensor
    clean_metric: float
    corrupt_metric: float
    layers: tuple[int, ...]
    axis: str | None
    site: str
    metric: str
    tokens: list[str] = field(default_factory=list)

    def normalized(self) -> torch.Tensor:
        """Recovery ``(patched − corrupt) / (clean − corrupt)`` (0: no effect, 1: fully clean)."""
        denom = self.clean_metric - self.corrupt_metric
        if denom == 0:
            raise ValueError(
                "clean and corrupt runs give the same metric, so recovery is undefined; "
                "check that the prompts differ in what the metric measures"
            )
        return (self.values - self.corrupt_metric) / denom

    def _columns(self) -> list[str]:
        if self.axis == "position":
            return [f"{i} {t!r}" for i, t in enumerate(self.tokens)] or [
                str(i) for i in range(self.values.shape[1])
            ]
        if self.axis == "head":
            return [f"H{h}" for h in range(self.values.shape[1])]
        return [self.metric]

    def table(self, normalized: bool = True) -> str:
        """The grid as text: layers down, positions (with tokens) or heads across."""
        values = self.normalized() if normalized else self.values
        return text_grid(values, [f"L{layer}" for layer in self.layers], self._columns())

    def top(self, k: int = 5, normalized: bool = True) -> list[tuple[int, int | None, float]]:
        """The ``k`` cells with the largest effect ``|value − corrupt|``, as ``(layer, index,
        value)``; the index is the position or head (``None`` for layer-only sweeps)."""
        values = self.normalized() if normalized else self.values
        effect = (self.values - self.corrupt_metric).abs().reshape(-1)
        flat = values.reshape(-1)
        width = self.values.shape[1] if self.values.dim() == 2 else 1
        order = effect.argsort(descending=True)[:k].tolist()
        return [
            (self.layers[i // width], (i % width) if self.axis else None, float(flat[i]))
            for i in order
        ]

    def plot(self, normalized: bool = True, ax: Any = None) -> Any:
        """Heatmap of the recovery (or the raw metric); needs matplotlib (``oculi[viz]``)."""
        values = self.normalized() if normalized else self.values
        if values.dim() == 1:
            values = values[:, None]
        what = "recovery" if normalized else self.metric
        return heatmap(
            values,
            row_labels=[str(layer) for layer in self.layers],
            col_labels=self._columns(),
            title=f"{self.site} patching: {what}",
            xlabel=self.axis or "",
            center=0.0,
            ax=ax,
        )


def _single(adapter: Adapter, prompt: Any, what: str) -> Batch:
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
    """The tokens of a one-prompt batch (see :func:`_single`) as strings, ``[]`` without a
    tokenizer."""
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
    """``metric`` of final-normed residual rows ``[N, d]``, ``[N]``, in row blocks.

    Sweeps collect the rows of all their patched copies and evaluate them here once: a metric
    that reads the whole vocabulary (probability, KL) then streams the ``[V, d]`` unembedding
    a few times in all instead of once per batch of copies.
    """
    cols = metric.columns()
    width = adapter.d_vocab if cols is None else len(cols)
    step = max(1, _LOGIT_BLOCK // width)
    parts = [
        metric(unembed(adapter, normed[i : i + step], cols)).float().cpu()
        for i in range(0, normed.shape[0], step)
    ]
    return torch.cat(parts) if parts else torch.empty(0)


def metric_of(adapter: Adapter, run: ResumableRun, metric: Metric) -> float:
    """The metric on an unpatched recorded run."""
    pos = run.position(metric.position)
    normed = run.run_from(adapter.n_layers, run.resid[-1:], positions=[pos])[:, 0]
    return float(metric(unembed(adapter, normed, metric.columns()))[0])


def activation_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    *,
    site: str = "resid_pre",
    metric: Metric,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_head: bool = False,
    per_position: bool = True,
    batch_size: int | None = 64,
    progress: bool = True,
) -> PatchingResult:
    """Patch clean activations of ``site`` into the corrupt run, one site at a time.

    Args:
        adapter: the model's adapter.
        clean, corrupt: one prompt each (string or ``[1, T]`` ids), of equal token length.
        site: a site kind (see :mod:`oculi.capture.sites`): ``resid_pre``, ``attn_out``,
            ``mlp_out``, ``z``, ``q``, ``k``, ``v``, ``pattern``, ``resid_post``, ...
        metric: e.g. ``patching.logit_diff(" Mary", " John")``.
        layers: layers to sweep (default all).
        positions: positions to sweep (default all) when ``per_position``.
        per_head: sweep heads instead of positions (per-head sites: ``z``, ``q``, ``k``, ``v``,
            ``pattern``); each patch covers every position of one head.
        per_position: sweep positions; ``False`` (and not ``per_head``) patches the whole
            site at once, giving ``[n_layers]``.
        batch_size: patched copies per forward (lower it to cap memory).
        progress: show a progress bar.

    Returns:
        :class:`PatchingResult`; ``values`` is ``[n_layers, T]`` (positions), ``[n_layers,
        n_heads]`` (heads) or ``[n_layers]``.
    """
    kind = check_patchable(adapter, site)
    if per_head and not kind.per_head:
        raise InputError(
            f"per_head=True needs a per-head site ({', '.join(PER_HEAD)}), got {site!r}"
        )
    cb, kb = _single(adapter, clean, "clean"), _single(adapter, corrupt, "corrupt")
    check_aligned(adapter, cb, kb)
    metric = metric.bind(adapter)
    check_read_position(metric, kb, "corrupt")
    layer_list = adapter.resolve_layers(layers)
    t = kb.input_ids.shape[1]

    clean_run, corrupt_run = ResumableRun(adapter, cb), ResumableRun(adapter, kb)
    if metric.kind == "kl":
        pos = clean_run.position(metric.position)
        normed = clean_run.run_from(adapter.n_layers, clean_run.resid[-1:], positions=[pos])[:, 0]
        metric = _with_reference(metric, unembed(adapter, normed, None)[0])
    clean_value = metric_of(adapter, clean_run, metric)
    corrupt_value = metric_of(adapter, corrupt_run, metric)
    clean_acts = _site_activations(adapter, cb, clean_run, site, layer_list)

    if per_head:
        n_heads = adapter.n_kv_heads if kind.kv else adapter.n_heads
        items: list[int | None] = list(range(n_heads))
        axis: str | None = "head"
    elif per_position:
        items = (
            [_abs_position(p, t) for p in positions] if positions is not None else list(range(t))
        )
        axis = "position"
    else:
        items = [None]
        axis = None

    read_pos = corrupt_run.position(metric.position)
    corrupt_acts = _site_activations(adapter, kb, corrupt_run, site, layer_list)
    late = axis == "position" and corrupt_run.can_start_late()
    # A patch that writes what the corrupt run already has, or writes after the position the
    # metric reads, cannot change the metric: those cells are the corrupt metric, exactly.
    out = torch.full((len(layer_list), len(items)), corrupt_value)
    jobs = []
    for li, layer in enumerate(layer_list):
        live = [
            (col, item)
            for col, item in enumerate(items)
            if not _no_op(kind, clean_acts[layer], corrupt_acts[layer], axis, item, read_pos)
        ]
        if late:
            # late only on the position axis, where every item is a position (an int)
            positioned = cast("list[tuple[int, int]]", live)
            jobs += [
                (li, layer, start, chunk)
                for start, chunk in _position_groups(positioned, t, batch_size)
            ]
        else:
            jobs += [(li, layer, 0, chunk) for chunk in _chunks(live, batch_size or len(live) or 1)]
    bar = _progress(len(jobs), progress, f"patching {site}")
    rows, cells = [], []
    for li, layer, start, chunk in jobs:
        specs = [
            PatchSpec(
                row=r,
                position=item if axis == "position" else None,
                head=item if axis == "head" else None,
            )
            for r, (_, item) in enumerate(chunk)
        ]
        rows.append(
            _run_patched(
                adapter, corrupt_run, site, layer, clean_acts[layer], specs, read_pos, start
            )
        )
        cells += [(li, col) for col, _ in chunk]
        bar.update(1)
    bar.close()
    if rows:
        li_idx, col_idx = (torch.tensor(ix) for ix in zip(*cells))
        out[li_idx, col_idx] = evaluate(adapter, metric, torch.cat(rows))
    values = out if axis is not None else out[:, 0]
    tokens = prompt_tokens(adapter, kb)
    return PatchingResult(
        values, clean_value, corrupt_value, layer_list, axis, site, metric.name, tokens
    )


def _with_reference(metric: Metric, logits: torch.Tensor) -> Metric:
    from dataclasses import replace

    return replace(metric, reference=torch.log_softmax(logits.float(), dim=-1))


def _abs_position(p: int, t: int) -> int:
    if not -t <= p < t:
        raise IndexError(f"position {p} out of range for a prompt of {t} tokens (0..{t - 1})")
    return p % t


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _no_op(kind, clean: torch.Tensor, corrupt: torch.Tensor, axis, item, read_pos: int) -> bool:
    """Whether patching ``item`` writes exactly what the corrupt run has, or comes too late."""
    if axis == "position":
        if item > read_pos:
            return True
        dim = 1 if kind.per_head else 0
        return torch.equal(clean.select(dim, item), corrupt.select(dim, item))
    if axis == "head":
        return torch.equal(clean[item], corrupt[item])
    return torch.equal(clean, corrupt)


_MIN_SAVED = 16


def _position_groups(
    live: list[tuple[int, int]], t: int, batch_size: int | None
) -> list[tuple[int, list[tuple[int, int]]]]:
    """Batches of position patches, each run from its earliest position on.

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


def _site_activations(
    adapter: Adapter, batch: Batch, run: ResumableRun, site: str, layers
) -> dict[int, torch.Tensor]:
    """The clean run's activation of ``site`` at each layer, without the batch dim."""
    if site == "resid_pre":
        return {layer: run.resid[layer] for layer in layers}
    if site == "resid_post":
        return {layer: run.resid[layer + 1] for layer in layers}
    recorded = record(adapter, batch, {site: tuple(layers)})
    have, tensor = recorded[site]
    return {layer: tensor[0, have.index(layer)] for layer in layers}


def _run_patched(
    adapter,
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


class _NoBar:
    def update(self, _n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
