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
from itertools import groupby
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from oculi.capture.engine import record
from oculi.capture.inputs import Batch
from oculi.capture.memory import plan_sweep
from oculi.capture.sites import PER_HEAD, WRITABLE
from oculi.errors import InputError
from oculi.patching._common import (
    Strategy,
    check_aligned,
    check_read_position,
    choose_strategy,
    chunks,
    evaluate,
    patched_copies,
    position_groups,
    progress_bar,
    prompt_tokens,
    recorded_pair,
    run_patched,
    single_prompt,
)
from oculi.patching.metrics import Metric
from oculi.patching.resume import Join, LayerPatchers, ResumableRun, run_joined
from oculi.patching.writers import PatchSpec, check_patchable, patchers_for
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

    def _repr_html_(self) -> str:
        """Jupyter's view: the recovery grid, as in the report."""
        from oculi.visualize.views import notebook, patching_view

        return notebook(patching_view(self))

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


def activation_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    *,
    site: str | tuple[str, Any] = "resid_pre",
    metric: Metric,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    per_head: bool = False,
    per_position: bool = True,
    batch_size: int | Literal["auto"] | None = "auto",
    strategy: Strategy = "auto",
    progress: bool = True,
) -> PatchingResult:
    """Patch clean activations of ``site`` into the corrupt run, one site at a time.

    Args:
        adapter: the model's adapter.
        clean, corrupt: one prompt each (string or ``[1, T]`` ids), of equal token length.
        site: a site kind (see :mod:`oculi.capture.sites`): ``resid_pre``, ``attn_out``,
            ``mlp_out``, ``z``, ``q``, ``k``, ``v``, ``pattern``, ``resid_post``, ...; or
            ``("sae", sae)``: the latents of an :class:`oculi.sae.SAE`, each set to its clean
            value (the SAE spliced with its error term), giving
            :class:`oculi.sae.LatentPatchingResult` ``[T, d_sae]`` (see
            :func:`oculi.sae.sae_activation_patching`; ``layers``, ``per_head`` and
            ``strategy`` do not apply).
        metric: e.g. ``patching.logit_diff(" Mary", " John")``.
        layers: layers to sweep (default all).
        positions: positions to sweep (default all) when ``per_position``.
        per_head: sweep heads instead of positions (per-head sites: ``z``, ``q``, ``k``, ``v``,
            ``pattern``); each patch covers every position of one head.
        per_position: sweep positions; ``False`` (and not ``per_head``) patches the whole
            site at once, giving ``[n_layers]``.
        batch_size: patched copies per forward (lower it to cap memory; ``None``: all;
            ``"auto"``: 64 with the layered strategy, all with the fused one). Lowered to
            what fits in free memory (:func:`oculi.capture.memory.plan_sweep`).
        strategy: how copies are batched (same numbers either way): ``"layered"`` runs the
            copies of each layer from that layer on (fewest FLOPs: CPUs), ``"fused"`` joins
            every layer's copies into one forward that grows as it goes (fewest launches:
            GPUs); ``"auto"`` picks by the model's device (:func:`choose_strategy`).
        progress: show a progress bar.

    Returns:
        :class:`PatchingResult`; ``values`` is ``[n_layers, T]`` (positions), ``[n_layers,
        n_heads]`` (heads) or ``[n_layers]``.
    """
    if not isinstance(site, str):
        from oculi.sae.patching import latent_sweep

        return latent_sweep(adapter, clean, corrupt, site, metric, layers, positions, per_head,
                            per_position, batch_size, progress)  # fmt: skip
    kind = _check_site(adapter, site, per_head)
    cb, kb = single_prompt(adapter, clean, "clean"), single_prompt(adapter, corrupt, "corrupt")
    check_aligned(adapter, cb, kb)
    metric = metric.bind(adapter)
    check_read_position(metric, kb, "corrupt")
    layer_list = adapter.resolve_layers(layers)
    fused = choose_strategy(strategy, adapter.device) == "fused"
    t = kb.input_ids.shape[1]

    clean_run, corrupt_run, metric, clean_value, corrupt_value = recorded_pair(
        adapter, cb, kb, metric
    )
    axis, items = _sweep_items(adapter, kind, per_head, per_position, positions, t)
    clean_acts = _site_activations(adapter, cb, clean_run, site, layer_list)
    corrupt_acts = _site_activations(adapter, kb, corrupt_run, site, layer_list)
    read_pos = corrupt_run.position(metric.position)
    # A patch that writes what the corrupt run already has, or writes after the position the
    # metric reads, cannot change the metric: those cells are the corrupt metric, exactly.
    skip = _no_op_mask(kind, clean_acts, corrupt_acts, layer_list, axis, items, read_pos)
    live = [
        [(col, item) for col, item in enumerate(items) if not skip[li][col]]
        for li in range(len(layer_list))
    ]
    sweep = _Sweep(adapter, corrupt_run, site, layer_list, clean_acts, read_pos, axis)
    late = axis == "position" and corrupt_run.can_start_late()
    run = _run_fused if fused else _run_layered
    wanted = (None if fused else 64) if batch_size == "auto" else batch_size
    size = plan_sweep(adapter, t, wanted, max(1, sum(map(len, live))))
    rows, cells = run(sweep, live, late, size, progress)
    out = torch.full((len(layer_list), len(items)), corrupt_value)
    if rows:
        li_idx, col_idx = (torch.tensor(ix) for ix in zip(*cells))
        out[li_idx, col_idx] = evaluate(adapter, metric, torch.cat(rows))
    values = out if axis is not None else out[:, 0]
    tokens = prompt_tokens(adapter, kb)
    return PatchingResult(
        values, clean_value, corrupt_value, layer_list, axis, site, metric.name, tokens
    )


def _check_site(adapter: Adapter, site: str, per_head: bool):
    """The site's kind, refusing sites that cannot be patched (as asked) in this model."""
    kind = check_patchable(adapter, site)
    if per_head and not kind.per_head:
        raise InputError(
            f"per_head=True needs a per-head site ({', '.join(PER_HEAD)}), got {site!r}"
        )
    return kind


def _sweep_items(
    adapter: Adapter, kind, per_head: bool, per_position: bool, positions, t: int
) -> tuple[str | None, list[int | None]]:
    """What the sweep's second axis indexes, and its items."""
    if per_head:
        return "head", list(range(adapter.n_kv_heads if kind.kv else adapter.n_heads))
    if per_position:
        wanted = [_abs_position(p, t) for p in positions] if positions is not None else range(t)
        return "position", list(wanted)
    return None, [None]


@dataclass(frozen=True)
class _Sweep:
    """What every batch of patched copies of one sweep shares."""

    adapter: Adapter
    run: ResumableRun
    site: str
    layers: tuple[int, ...]
    clean: dict[int, torch.Tensor]
    read_pos: int
    axis: str | None

    def specs(self, items: Sequence[int | None], first_row: int = 0) -> list[PatchSpec]:
        head = self.axis == "head"
        return [
            PatchSpec(row=first_row + r, position=None if head else it, head=it if head else None)
            for r, it in enumerate(items)
        ]


def _run_layered(sweep: _Sweep, live, late: bool, batch_size: int | None, progress: bool):
    """The copies of each layer as batches run from that layer on (and, with ``late``, from
    their earliest patched position on); returns the final-normed rows and their cells."""
    jobs = []
    for li, layer in enumerate(sweep.layers):
        if late:
            # late only on the position axis, where every item is a position (an int)
            jobs += [
                (li, layer, s, c)
                for s, c in position_groups(live[li], sweep.run.resid.shape[1], batch_size)
            ]
        else:
            jobs += [(li, layer, 0, c) for c in chunks(live[li], batch_size or len(live[li]) or 1)]
    bar = progress_bar(len(jobs), progress, f"patching {sweep.site}")
    rows, cells = [], []
    for li, layer, start, chunk in jobs:
        specs = sweep.specs([item for _, item in chunk])
        clean = sweep.clean[layer]
        normed = run_patched(
            sweep.adapter, sweep.run, sweep.site, layer, clean, specs, sweep.read_pos, start
        )
        rows.append(normed)
        cells += [(li, col) for col, _ in chunk]
        bar.update(1)
    bar.close()
    return rows, cells


def _run_fused(sweep: _Sweep, live, late: bool, batch_size: int | None, progress: bool):
    """Every layer's copies in one forward that grows as it goes (see ``run_joined``), in
    batches of ``batch_size`` copies (and, with ``late``, one forward per group of positions
    that can start late); returns the final-normed rows and their cells."""
    by_layer = sorted(range(len(sweep.layers)), key=lambda li: sweep.layers[li])
    flat = [(li, col, item) for li in by_layer for col, item in live[li]]
    t = sweep.run.resid.shape[1]
    if late:
        grouped = position_groups([(i, cast(int, c[2])) for i, c in enumerate(flat)], t, None)
        groups = [(start, sorted(i for i, _ in group)) for start, group in grouped]
    else:
        groups = [(0, list(range(len(flat))))] if flat else []
    jobs = [(s, chunk) for s, idx in groups for chunk in chunks(idx, batch_size or len(idx))]
    bar = progress_bar(len(jobs), progress, f"patching {sweep.site}")
    rows, cells = [], []
    for start, chunk in jobs:
        batch = [flat[i] for i in chunk]
        rows.append(_fused_batch(sweep, batch, start))
        cells += [(li, col) for li, col, _ in batch]
        bar.update(1)
    bar.close()
    return rows, cells


def _fused_batch(sweep: _Sweep, cells: list, start: int) -> torch.Tensor:
    """Final-normed rows ``[len(cells), d]`` of one fused forward; ``cells`` sorted by layer."""
    run, site = sweep.run, sweep.site
    joins: list[Join] = []
    patchers: LayerPatchers = {}
    row = 0
    for li, group in groupby(cells, key=lambda c: c[0]):
        layer = sweep.layers[li]
        items = [item for _, _, item in group]
        clean = sweep.clean[layer]
        if site in ("resid_pre", "resid_post"):
            enter = layer + (site == "resid_post")
            joins.append((enter, 0, patched_copies(run.resid[enter, start:], clean, items, start)))
        else:
            base = run.resid[layer, start:].unsqueeze(0).expand(len(items), -1, -1)
            joins.append((layer, 0, base))
            specs = sweep.specs(items, row)
            patchers.update(
                patchers_for(sweep.adapter, site, layer, clean, specs, run.resid[layer], start)
            )
        row += len(items)
    return run_joined([run], joins, patchers=patchers, position=sweep.read_pos, start=start)


def _abs_position(p: int, t: int) -> int:
    if not -t <= p < t:
        raise IndexError(f"position {p} out of range for a prompt of {t} tokens (0..{t - 1})")
    return p % t


def _no_op_mask(
    kind, clean: dict, corrupt: dict, layers: Sequence[int], axis, items, read_pos: int
) -> list[list[bool]]:
    """Per layer and item, whether patching it writes exactly what the corrupt run has, or
    comes after the read position: one comparison of all layers, one device sync."""
    same = torch.stack([clean[layer] for layer in layers]) == torch.stack(
        [corrupt[layer] for layer in layers]
    )  # [n, ...site]
    if axis == "position":
        dim = 2 if kind.per_head else 1
        equal = same.movedim(dim, 1).flatten(2).all(-1)  # [n, T]
        pos = torch.tensor(items)
        mask = equal[:, pos.to(equal.device)].cpu() | (pos > read_pos)
    elif axis == "head":
        mask = same.flatten(2).all(-1)[:, list(items)]
    else:
        mask = same.flatten(1).all(-1)[:, None]
    return mask.tolist()


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
