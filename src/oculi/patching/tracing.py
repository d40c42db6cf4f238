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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.engine import record
from oculi.errors import InputError
from oculi.models.anatomy import get_path
from oculi.patching.activation import (
    _position_groups,
    _progress,
    _run_patched,
    _single,
    check_aligned,
    evaluate,
    prompt_tokens,
)
from oculi.patching.metrics import probability
from oculi.patching.resume import ResumableRun, unembed
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
    """Token positions of ``subject`` inside ``prompt`` (from the tokenizer's offsets)."""
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
    with torch.no_grad():
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
        progress: show a progress bar.
    """
    if kind not in _SITE:
        raise InputError(f"kind must be 'resid', 'mlp' or 'attn', got {kind!r}")
    window = window or (1 if kind == "resid" else 10)
    clean = _single(adapter, prompt, "prompt")
    metric = probability(target).bind(adapter)
    clean_run = ResumableRun(adapter, clean)
    read = clean_run.position(-1)
    site = _SITE[kind]
    clean_acts = (
        None
        if kind == "resid"
        else record(adapter, clean, {site: tuple(range(adapter.n_layers))})[site][1][0]
    )
    positions = subject_positions(adapter, prompt, subject) if corrupt is None else []

    if corrupt is not None:
        corrupt_batch = _single(adapter, corrupt, "corrupt")
        check_aligned(adapter, clean, corrupt_batch)
        runs = [ResumableRun(adapter, corrupt_batch)]
    else:
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

    def prob(normed: torch.Tensor) -> torch.Tensor:
        return metric(unembed(adapter, normed, None))

    clean_prob = float(
        prob(clean_run.run_from(adapter.n_layers, clean_run.resid[-1:], positions=[read])[:, 0])[0]
    )
    corrupt_prob = sum(
        float(prob(r.run_from(adapter.n_layers, r.resid[-1:], positions=[read])[:, 0])[0])
        for r in runs
    ) / len(runs)

    n, t = adapter.n_layers, clean.input_ids.shape[1]
    total = torch.zeros(n, t)
    bar = _progress(n * len(runs), progress, f"causal tracing ({kind})")
    for run in runs:
        # Before the first corrupted position the corrupted run *is* the clean run (causal
        # attention), so restoring there changes nothing; and a copy restored at p equals the
        # corrupted run before p, so it is run from p on (see ResumableRun.run_from's start).
        differs = (run.resid[0] != clean_run.resid[0]).any(-1).nonzero()
        first = int(differs[0]) if len(differs) else t
        live = [(p, p) for p in range(first, read + 1)]
        groups = (
            _position_groups(live, t, None) if run.can_start_late() else [(0, live)] if live else []
        )
        base = float(prob(run.run_from(n, run.resid[-1:], positions=[read])[:, 0])[0])
        rows, cells = [], []
        for layer in range(n):
            for start, chunk in groups:
                specs = [PatchSpec(row=r, position=p) for r, (_, p) in enumerate(chunk)]
                if kind == "resid":
                    normed = _run_patched(
                        adapter,
                        run,
                        "resid_post",
                        layer,
                        clean_run.resid[layer + 1],
                        specs,
                        read,
                        start,
                    )
                else:
                    assert clean_acts is not None  # recorded for every kind but resid
                    # ROME's window: layers [l - w//2, l - w//2 + w), clipped to the model
                    lo = max(0, layer - window // 2)
                    hi = min(n, layer - window // 2 + window)
                    patchers = {}
                    for w_layer in range(lo, hi):
                        patchers.update(
                            patchers_for(
                                adapter,
                                site,
                                w_layer,
                                clean_acts[w_layer],
                                specs,
                                run.resid[w_layer],
                                start,
                            )
                        )
                    begin = run.resid[lo, start:].unsqueeze(0).expand(len(specs), -1, -1)
                    normed = run.run_from(
                        lo, begin, patchers=patchers, positions=[read], start=start
                    )[:, 0]
                rows.append(normed)
                cells += [(layer, p) for _, p in chunk]
            bar.update(1)
        grid = torch.full((n, t), base)
        if rows:
            li_idx, pos_idx = (torch.tensor(ix) for ix in zip(*cells))
            grid[li_idx, pos_idx] = evaluate(adapter, metric, torch.cat(rows))
        total += grid
    bar.close()
    tokens = prompt_tokens(adapter, clean)
    return TracingResult(
        total / len(runs), clean_prob, corrupt_prob, kind, window, tokens, positions
    )
