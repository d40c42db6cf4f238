"""Causal tracing (ROME): where in the network does a factual association live?

Take a prompt whose next token is a fact about a subject ("The Eiffel Tower is located in
the city of" → " Paris"). Corrupt the subject — by Gaussian noise on its token embeddings
(ROME's method: 3 × the embedding standard deviation, averaged over seeded samples) or by
swapping in a different subject (``corrupt=``, seed 004's interchange) — so the model loses
the fact. Then restore one clean state at a time, a layer × position grid of them, and see
how much probability of the answer comes back. States: the residual stream (``kind="resid"``:
each layer's output), or a window of MLP or attention outputs (``kind="mlp"``/``"attn"``,
ROME's window of 10 layers centred on the layer).

::

    res = oculi.causal_tracing(adapter, "The Eiffel Tower is located in the city of",
                               subject="The Eiffel Tower", target=" Paris")
    res.values            # [n_layers, T]: p(target) with that state restored
    res.clean_prob, res.corrupt_prob
    res.normalized()      # recovery (0: nothing restored, 1: the clean probability)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.engine import record
from oculi.capture.inputs import Batch
from oculi.capture.interrupts import no_grad
from oculi.capture.memory import plan_sweep
from oculi.errors import InputError
from oculi.models.anatomy import get_path
from oculi.patching._common import (
    Strategy,
    check_aligned,
    choose_strategy,
    chunks,
    evaluate,
    final_normed,
    patched_copies,
    position_groups,
    progress_bar,
    prompt_tokens,
    run_patched,
    single_prompt,
)
from oculi.patching.metrics import probability
from oculi.patching.resume import Join, LayerPatchers, ResumableRun, run_joined, unembed
from oculi.patching.writers import PatchSpec, patchers_for
from oculi.viz import heatmap, text_grid

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

Kind = Literal["resid", "mlp", "attn"]
_SITE = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}


@dataclass
class TracingResult:
    """A causal-tracing grid.

    Attributes:
        values: ``p(target)`` with the clean state at (layer, position) restored,
            ``[n_layers, T]``, averaged over noise samples.
        clean_prob, corrupt_prob: ``p(target)`` on the clean and the corrupted run.
        kind, window: which state was restored, over how many layers.
        tokens: the prompt's tokens; subject_positions: the corrupted positions.
    """

    values: torch.Tensor
    clean_prob: float
    corrupt_prob: float
    kind: str
    window: int
    tokens: list[str] = field(default_factory=list)
    subject_positions: list[int] = field(default_factory=list)

    @property
    def indirect_effect(self) -> torch.Tensor:
        """``values − corrupt_prob``: the probability each restoration brings back."""
        return self.values - self.corrupt_prob

    def normalized(self) -> torch.Tensor:
        """Recovery ``(values − corrupt) / (clean − corrupt)``."""
        denom = self.clean_prob - self.corrupt_prob
        if denom == 0:
            raise ValueError("the corruption did not change p(target); recovery is undefined")
        return (self.values - self.corrupt_prob) / denom

    def _columns(self) -> list[str]:
        marks = set(self.subject_positions)
        return [f"{i} {t!r}" + ("*" if i in marks else "") for i, t in enumerate(self.tokens)] or [
            str(i) for i in range(self.values.shape[1])
        ]

    def table(self) -> str:
        """``p(target)`` per layer (down) and position (across; ``*`` marks the subject)."""
        rows = [f"L{i}" for i in range(self.values.shape[0])]
        return text_grid(self.values, rows, self._columns(), fmt="{:5.3f}")

    def _repr_html_(self) -> str:
        """Jupyter's view: the tracing grid, as in the report."""
        from oculi.visualize.views import notebook, tracing_view

        return notebook(tracing_view(self))

    def plot(self, ax: Any = None) -> Any:
        """ROME-style heatmap of ``p(target)`` per restored (layer, position)."""
        return heatmap(
            self.values,
            row_labels=[str(i) for i in range(self.values.shape[0])],
            col_labels=self._columns(),
            title=f"causal tracing ({self.kind}, window {self.window}): p(target), "
            f"clean {self.clean_prob:.3f}, corrupted {self.corrupt_prob:.3f}",
            xlabel="restored position (* subject)",
            center=None,
            cmap="Purples",
            ax=ax,
        )


def subject_positions(adapter: Adapter, prompt: str, subject: str) -> list[int]:
    """Token positions of ``subject`` inside ``prompt`` (from the tokenizer's offsets).

    ::

        subject_positions(adapter, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
        # [1, 2, 3] on Gemma 3 270M (position 0 is <bos>)
    """
    start = prompt.find(subject)
    if start < 0:
        raise InputError(f"subject {subject!r} does not occur in the prompt {prompt!r}")
    end = start + len(subject)
    enc = adapter.tokenizer(prompt, return_offsets_mapping=True)
    positions = [
        i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < end and b > start
    ]
    if not positions:
        raise InputError(f"subject {subject!r} covers no token of the prompt")
    return positions


def embedding_std(adapter: Adapter, n: int = 4096, seed: int = 0) -> float:
    """Standard deviation of the embedding module's output over a seeded sample of tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, adapter.vocab_limit, (1, n), generator=gen).to(adapter.device)
    with no_grad():
        return float(get_path(adapter.model, adapter.anatomy.embed)(ids).float().std())


def causal_tracing(
    adapter: Adapter,
    prompt: str,
    subject: str,
    target: str | int,
    *,
    kind: Kind = "resid",
    window: int | None = None,
    corrupt: str | None = None,
    noise: float = 3.0,
    samples: int = 10,
    seed: int = 0,
    batch_size: int | None = None,
    strategy: Strategy = "auto",
    progress: bool = True,
) -> TracingResult:
    """Restore clean states into a corrupted run over layers × positions.

    Args:
        adapter: the model's adapter.
        prompt: the clean prompt.
        subject: the substring of ``prompt`` to corrupt.
        target: the answer token (string checked to be one token, or an id).
        kind: ``"resid"`` (layer outputs), ``"mlp"`` or ``"attn"`` (branch outputs).
        window: layers restored at once, centred on each layer (default 1 for ``resid``,
            10 for ``mlp``/``attn`` as in ROME).
        corrupt: a prompt to interchange with instead of adding noise (same token length).
        noise: noise scale in units of the embedding standard deviation.
        samples: noise samples to average (ignored with ``corrupt``).
        seed: seed of the noise.
        batch_size: restored copies per forward with the ``"fused"`` strategy (``None``: all,
            every noise sample included, in one forward per group of late starts), lowered
            to what fits in free memory (:func:`oculi.capture.memory.plan_sweep`).
        strategy: ``"layered"`` (each layer's restorations of one sample as a batch run from
            there: CPUs), ``"fused"`` (all layers and all noise samples in one growing
            forward: GPUs) or ``"auto"`` (by device); see
            :func:`~oculi.patching._common.choose_strategy`. Same numbers either way.
        progress: show a progress bar.

    Example::

        result = oculi.causal_tracing(adapter, "The Eiffel Tower is located in the city of",
                                      subject="The Eiffel Tower", target=" Paris")
        result.values.shape        # [L, T]: p(" Paris") with each layer's state restored there
    """
    if kind not in _SITE:
        raise InputError(f"kind must be 'resid', 'mlp' or 'attn', got {kind!r}")
    _check_noise(noise, adapter.dtype)
    fused = choose_strategy(strategy, adapter.device) == "fused"
    clean = single_prompt(adapter, prompt, "prompt")
    metric = probability(target).bind(adapter)
    positions = subject_positions(adapter, prompt, subject) if corrupt is None else []
    trace = _Trace.record(adapter, clean, kind, window or (1 if kind == "resid" else 10))
    runs = _corrupted_runs(adapter, clean, corrupt, positions, noise, samples, seed)
    clean_prob = _unpatched_prob(trace, metric, trace.clean_run)
    bases = [_unpatched_prob(trace, metric, run) for run in runs]
    corrupt_prob = sum(bases) / len(runs)

    n, t = adapter.n_layers, clean.input_ids.shape[1]
    # Before the first corrupted position the corrupted run *is* the clean run (causal
    # attention), so restoring there changes nothing: those cells are the run's base value.
    cells = [
        (r, layer, p)
        for r, run in enumerate(runs)
        for layer in range(n)
        for p in range(_first_difference(run, trace.clean_run), trace.read + 1)
    ]
    sweep = _trace_fused if fused else _trace_layered
    size = plan_sweep(adapter, t, batch_size, max(1, len(cells)))
    rows, order = sweep(trace, runs, cells, size, progress)
    grids = torch.tensor(bases)[:, None, None].repeat(1, n, t)
    if rows:
        r_idx, l_idx, p_idx = (torch.tensor(ix) for ix in zip(*order))
        grids[r_idx, l_idx, p_idx] = evaluate(adapter, metric, torch.cat(rows))
    tokens = prompt_tokens(adapter, clean)
    return TracingResult(
        grids.sum(0) / len(runs), clean_prob, corrupt_prob, kind, trace.window, tokens, positions
    )


def _check_noise(noise: float, dtype: torch.dtype) -> None:
    """A finite scale > 0 that the model's dtype can hold (NaN or inf noise would corrupt the
    run into NaN logits, read as a probability of 0 and a "strong" restoration effect)."""
    top = torch.finfo(dtype).max if dtype.is_floating_point else float("inf")
    if (
        isinstance(noise, bool)
        or not isinstance(noise, (int, float))
        or not math.isfinite(noise)
        or not 0 < noise < top
    ):
        raise InputError(
            f"noise must be a finite number > 0 (in embedding standard deviations; 3 as in "
            f"ROME), got {noise!r}"
        )


def _corrupted_runs(
    adapter: Adapter,
    clean: Batch,
    corrupt: str | None,
    positions: list[int],
    noise: float,
    samples: int,
    seed: int,
) -> list[ResumableRun]:
    """The interchanged prompt's run, or one run per seeded noise sample on the subject."""
    if corrupt is not None:
        corrupt_batch = single_prompt(adapter, corrupt, "corrupt")
        check_aligned(adapter, clean, corrupt_batch)
        return [ResumableRun(adapter, corrupt_batch)]
    sigma = noise * embedding_std(adapter)
    gen = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(samples):
        eps = torch.randn(len(positions), adapter.d_model, generator=gen) * sigma

        def add_noise(emb, eps=eps):
            emb = emb.clone()
            emb[0, positions] += eps.to(emb.device, emb.dtype)
            return emb

        runs.append(ResumableRun(adapter, clean, embed_hook=add_noise))
    return runs


def _first_difference(run: ResumableRun, clean_run: ResumableRun) -> int:
    """The first position where ``run``'s embeddings differ from the clean run's."""
    differs = (run.resid[0] != clean_run.resid[0]).any(-1).nonzero()
    return int(differs[0]) if len(differs) else run.resid.shape[1]


@dataclass(frozen=True)
class _Trace:
    """What every restoration of one trace shares: the clean run and the restored site."""

    adapter: Adapter
    kind: str
    window: int
    clean_run: ResumableRun
    clean_acts: torch.Tensor | None  # [L, T, d] of the branch output (mlp/attn kinds)
    read: int

    @classmethod
    def record(cls, adapter: Adapter, clean: Batch, kind: str, window: int) -> _Trace:
        site = _SITE[kind]
        acts = (
            None
            if kind == "resid"
            else record(adapter, clean, {site: tuple(range(adapter.n_layers))})[site][1][0]
        )
        run = ResumableRun(adapter, clean)
        return cls(adapter, kind, window, run, acts, run.position(-1))

    @property
    def site(self) -> str:
        return _SITE[self.kind]

    def span(self, layer: int) -> range:
        """Layers restored for ``layer``: ROME's window ``[l - w//2, l - w//2 + w)``, clipped."""
        n = self.adapter.n_layers
        return range(
            max(0, layer - self.window // 2), min(n, layer - self.window // 2 + self.window)
        )


def _unpatched_prob(trace: _Trace, metric, run: ResumableRun) -> float:
    return float(metric(unembed(trace.adapter, final_normed(run, trace.read), None))[0])


def _groups(run: ResumableRun, cells: list, t: int) -> list[tuple[int, list]]:
    """Cells grouped by where their copies can start (a copy restored at ``p`` equals the
    corrupted run before ``p``, see ``ResumableRun.run_from``'s ``start``)."""
    if not run.can_start_late():
        return [(0, list(range(len(cells))))] if cells else []
    grouped = position_groups([(i, c[2]) for i, c in enumerate(cells)], t, None)
    return [(start, sorted(i for i, _ in group)) for start, group in grouped]


def _trace_layered(trace: _Trace, runs, cells, _batch_size, progress: bool):
    """Per noise sample and layer, the restorations as one batch run from that layer on."""
    n, t = trace.adapter.n_layers, trace.clean_run.resid.shape[1]
    bar = progress_bar(n * len(runs), progress, f"causal tracing ({trace.kind})")
    rows, order = [], []
    for r, run in enumerate(runs):
        mine = [c for c in cells if c[0] == r and c[1] == 0]
        groups = [(start, [mine[i][2] for i in idx]) for start, idx in _groups(run, mine, t)]
        for layer in range(n):
            for start, ps in groups:
                rows.append(_restore(trace, run, layer, ps, start))
                order += [(r, layer, p) for p in ps]
            bar.update(1)
    bar.close()
    return rows, order


def _restore(trace: _Trace, run: ResumableRun, layer: int, ps: list[int], start: int):
    """Final-normed rows of ``run`` with the clean state at ``layer`` restored at each of
    ``ps`` (one copy each)."""
    adapter, read = trace.adapter, trace.read
    specs = [PatchSpec(row=i, position=p) for i, p in enumerate(ps)]
    if trace.kind == "resid":
        clean = trace.clean_run.resid[layer + 1]
        return run_patched(adapter, run, "resid_post", layer, clean, specs, read, start)
    assert trace.clean_acts is not None  # recorded for every kind but resid
    span = trace.span(layer)
    patchers: LayerPatchers = {}
    for w in span:
        acts = trace.clean_acts[w]
        patchers.update(patchers_for(adapter, trace.site, w, acts, specs, run.resid[w], start))
    begin = run.resid[span[0], start:].unsqueeze(0).expand(len(specs), -1, -1)
    return run.run_from(span[0], begin, patchers=patchers, positions=[read], start=start)[:, 0]


def _trace_fused(trace: _Trace, runs, cells, batch_size: int | None, progress: bool):
    """Every restoration of every noise sample in one forward per group of late starts (in
    batches of ``batch_size`` copies), copies joining at the first layer they restore."""
    t = trace.clean_run.resid.shape[1]
    enter = (lambda c: c[1] + 1) if trace.kind == "resid" else (lambda c: trace.span(c[1])[0])
    jobs = []
    for start, idx in _groups(runs[0], cells, t):
        # sorted by the layer copies join at, then by noise sample: one join per pair
        idx.sort(key=lambda i: (enter(cells[i]), cells[i][0]))
        jobs += [(start, chunk) for chunk in chunks(idx, batch_size or len(idx))]
    bar = progress_bar(len(jobs), progress, f"causal tracing ({trace.kind})")
    rows, order = [], []
    for start, chunk in jobs:
        batch = [cells[i] for i in chunk]
        rows.append(_fused_restore(trace, runs, batch, start, enter))
        order += batch
        bar.update(1)
    bar.close()
    return rows, order


def _fused_restore(trace: _Trace, runs, batch: list, start: int, enter) -> torch.Tensor:
    adapter, clean_run = trace.adapter, trace.clean_run
    joins: list[Join] = []
    restored: dict[int, list[PatchSpec]] = {}  # layer -> rows restored there (window kinds)
    row = 0
    for (layer_in, r), group in groupby(batch, key=lambda c: (enter(c), c[0])):
        cells = list(group)
        ps = [p for _, _, p in cells]
        base = runs[r].resid[layer_in, start:]
        if trace.kind == "resid":
            joins.append((layer_in, r, patched_copies(base, clean_run.resid[layer_in], ps, start)))
        else:
            joins.append((layer_in, r, base.unsqueeze(0).expand(len(ps), -1, -1)))
            for i, (_, layer, p) in enumerate(cells):
                for w in trace.span(layer):
                    restored.setdefault(w, []).append(PatchSpec(row=row + i, position=p))
        row += len(cells)
    patchers: LayerPatchers = {}
    for w, specs in restored.items():
        assert trace.clean_acts is not None
        acts, resid = trace.clean_acts[w], clean_run.resid[w]
        patchers.update(patchers_for(adapter, trace.site, w, acts, specs, resid, start))
    return run_joined(runs, joins, patchers=patchers, position=trace.read, start=start)
