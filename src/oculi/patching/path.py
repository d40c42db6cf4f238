"""Path patching (Wang et al., 2022, the IOI paper): effects along one path only.

Activation patching a head measures everything downstream of it. Path patching asks how
much of a head's effect flows *directly* into chosen receivers: the logits, or the queries,
keys or values of later heads. The base run is the clean prompt; the senders' outputs come
from the corrupt prompt:

1. Run the clean prompt with the senders' outputs (``z``) taken from the corrupt run and
   every later attention layer's output frozen to its clean value (MLPs recompute), so the
   senders' change reaches later layers only through the residual stream, not through other
   heads. Read the receivers' inputs there (or, for the logits, the metric directly).
2. Run the clean prompt again with only the receivers' inputs replaced by those values, and
   measure the metric.

``values[l, h]`` is the metric with sender head ``(l, h)`` path-patched; heads at or after
the receivers' layer have no path and keep the clean metric. ``normalized()`` is 1 where the
path carries nothing and 0 where it carries the whole clean–corrupt difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.engine import record
from oculi.errors import InputError
from oculi.patching._common import (
    Strategy,
    check_aligned,
    check_read_position,
    choose_strategy,
    metric_of,
    progress_bar,
    prompt_tokens,
    single_prompt,
)
from oculi.patching.activation import PatchingResult
from oculi.patching.metrics import Metric
from oculi.patching.resume import Join, LayerPatchers, ResumableRun, run_joined, unembed
from oculi.patching.writers import PatchSpec, patchers_for

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

Head = tuple[int, int]


def path_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    *,
    metric: Metric,
    receivers: Sequence[Head] | None = None,
    receiver_input: str = "q",
    senders: Sequence[Head] | None = None,
    strategy: Strategy = "auto",
    progress: bool = True,
) -> PatchingResult:
    """Path-patch each sender head (default: every head) into the receivers.

    Args:
        adapter: the model's adapter.
        clean, corrupt: one prompt each, of equal token length.
        metric: e.g. ``patching.logit_diff(" Mary", " John")``.
        receivers: ``[(layer, head), ...]`` whose input is patched, or ``None`` for the
            logits (the senders' direct effect).
        receiver_input: which input of the receivers: ``"q"``, ``"k"`` or ``"v"``.
        senders: heads to sweep (default all); the result still has shape
            ``[n_layers, n_heads]`` with untested heads left at NaN.
        strategy: ``"layered"`` (one forward per sender layer: CPUs), ``"fused"`` (every
            sender layer in one growing forward: GPUs) or ``"auto"`` (by device); see
            :func:`~oculi.patching._common.choose_strategy`. Same numbers either way.
        progress: show a progress bar.
    """
    if receiver_input not in ("q", "k", "v"):
        raise InputError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}")
    cb, kb = single_prompt(adapter, clean, "clean"), single_prompt(adapter, corrupt, "corrupt")
    check_aligned(adapter, cb, kb)
    metric = metric.bind(adapter)
    check_read_position(metric, cb, "clean")
    n, h = adapter.n_layers, adapter.n_heads
    recv = _heads(adapter, receivers or [])
    wanted = (
        _heads(adapter, senders) if senders else [(lr, hd) for lr in range(n) for hd in range(h)]
    )
    clean_run = ResumableRun(adapter, cb)
    clean_value = metric_of(adapter, clean_run, metric)
    corrupt_value = metric_of(adapter, ResumableRun(adapter, kb), metric)
    all_layers = tuple(range(n))
    paths = _Paths(
        adapter,
        clean_run,
        corrupt_z=record(adapter, kb, {"z": all_layers})["z"][1][0],
        clean_attn_out=record(adapter, cb, {"attn_out": all_layers})["attn_out"][1][0],
        receivers=recv,
        receiver_input=receiver_input,
        read=clean_run.position(metric.position),
    )
    first_recv = min((layer for layer, _ in recv), default=n)

    out = torch.full((n, h), float("nan"))
    by_layer: dict[int, list[int]] = {}
    for layer, head in wanted:
        by_layer.setdefault(layer, []).append(head)
    groups = [(layer, heads) for layer, heads in sorted(by_layer.items()) if layer < first_recv]
    for layer, heads in by_layer.items():
        if layer >= first_recv:
            out[layer, heads] = clean_value  # no path from here into the receivers
    if groups:
        fused = choose_strategy(strategy, adapter.device) == "fused"
        normed = paths.fused(groups) if fused else paths.layered(groups, progress)
        values = metric(unembed(adapter, normed, metric.columns())).float().cpu()
        rows = [(layer, hd) for layer, heads in groups for hd in heads]
        layer_idx, head_idx = (torch.tensor(ix) for ix in zip(*rows))
        out[layer_idx, head_idx] = values
    tokens = prompt_tokens(adapter, cb)
    name = "logits" if not recv else f"{receiver_input} of {recv}"
    return PatchingResult(
        out, clean_value, corrupt_value, all_layers, "head", f"z -> {name}", metric.name, tokens
    )


def _heads(adapter: Adapter, heads: Sequence[Head]) -> list[Head]:
    return [(adapter.resolve_layer(lr), adapter.resolve_head(hd, "z")) for lr, hd in heads]


@dataclass(frozen=True)
class _Paths:
    """One path-patching sweep: the clean run, the senders' corrupt outputs, the receivers."""

    adapter: Adapter
    clean_run: ResumableRun
    corrupt_z: torch.Tensor  # [L, T, H, D]
    clean_attn_out: torch.Tensor  # [L, T, d]
    receivers: list[Head]
    receiver_input: str
    read: int

    def layered(self, groups: list[tuple[int, list[int]]], progress: bool) -> torch.Tensor:
        """Final-normed rows, one forward per sender layer run from that layer on."""
        bar = progress_bar(len(groups), progress, "path patching")
        rows = []
        run = self.clean_run
        for layer, heads in groups:
            start = run.resid[layer].unsqueeze(0).expand(len(heads), -1, -1)

            def runner(patchers, stop, layer=layer, start=start):
                if stop is not None:
                    return run.run_from(layer, start, patchers=patchers, stop_after=stop)
                return run.run_from(layer, start, patchers=patchers, positions=[self.read])[:, 0]

            rows.append(self._finish(runner, self._patchers([(layer, heads)])))
            bar.update(1)
        bar.close()
        return torch.cat(rows)

    def fused(self, groups: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Final-normed rows of every sender layer in one growing forward (see ``run_joined``)."""
        run = self.clean_run
        joins: list[Join] = [
            (layer, 0, run.resid[layer].unsqueeze(0).expand(len(heads), -1, -1))
            for layer, heads in groups
        ]
        patchers = self._patchers(groups)
        return self._finish(
            lambda p, stop: run_joined(
                [run], joins, patchers=p, position=self.read, stop_after=stop
            ),
            patchers,
        )

    def _patchers(self, groups: list[tuple[int, list[int]]]) -> LayerPatchers:
        """Senders' corrupt ``z`` at their layer, and every later attention output frozen to
        its clean value, for rows numbered group after group."""
        adapter, run = self.adapter, self.clean_run
        patchers: LayerPatchers = {}
        row = 0
        for layer, heads in groups:
            specs = [PatchSpec(row=row + r, head=hd) for r, hd in enumerate(heads)]
            z = self.corrupt_z[layer]
            _add(patchers, patchers_for(adapter, "z", layer, z, specs, run.resid[layer]))
            row += len(heads)
        for later in range(groups[0][0] + 1, adapter.n_layers):
            before = sum(len(heads) for layer, heads in groups if layer < later)
            frozen = [PatchSpec(row=r) for r in range(before)]
            attn = self.clean_attn_out[later]
            _add(patchers, patchers_for(adapter, "attn_out", later, attn, frozen, run.resid[later]))
        return patchers

    def _finish(self, runner, patchers: LayerPatchers) -> torch.Tensor:
        """Run with ``patchers``: to the metric's position, or via the receivers' inputs."""
        if not self.receivers:
            return runner(patchers, None)
        kind = self.receiver_input
        inputs = _receiver_inputs(self.adapter, runner, patchers, self.receivers, kind)
        return _run_with_receivers(
            self.adapter, self.clean_run, inputs, self.receivers, kind, self.read
        )


def _add(patchers: LayerPatchers, more: LayerPatchers) -> None:
    """Merge ``more`` into ``patchers``; a layer in both registers both."""
    for layer, register in more.items():
        previous = patchers.get(layer)
        if previous is None:
            patchers[layer] = register
            continue

        def both(hooks, first=previous, second=register):
            first(hooks)
            second(hooks)

        patchers[layer] = both


def _receiver_inputs(adapter, runner, patchers, recv, kind) -> dict[int, torch.Tensor]:
    """Step 1: receivers' ``kind`` input per row, ``{layer: [rows, H(_kv), T, D]}``."""
    recv_layers = sorted({rl for rl, _ in recv})
    got: dict[int, torch.Tensor] = {}
    for rl in recv_layers:
        taps = LayerTaps()
        getattr(taps, kind).append(lambda x, rl=rl: got.__setitem__(rl, x.detach().clone()))
        previous = patchers.get(rl)

        def register(hooks, rl=rl, taps=taps, previous=previous):
            if previous is not None:
                previous(hooks)
            hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, {rl: taps})
            )

        patchers[rl] = register
    runner(patchers, max(recv_layers))
    return got


def _run_with_receivers(adapter, run: ResumableRun, inputs, recv, kind, read) -> torch.Tensor:
    """Step 2: the clean run with only the receivers' inputs replaced."""
    rows = next(iter(inputs.values())).shape[0]
    group = adapter.n_heads // adapter.n_kv_heads
    patchers: LayerPatchers = {}
    for rl in sorted(inputs):
        heads = sorted({hd if kind == "q" else hd // group for layer, hd in recv if layer == rl})

        def write(x, new=inputs[rl], heads=heads):
            x = x.clone()
            x[:, heads] = new[:, heads].to(x.dtype)
            return x

        taps = LayerTaps()
        getattr(taps, kind).append(write)

        def register(hooks, rl=rl, taps=taps):
            hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, {rl: taps})
            )

        patchers[rl] = register
    first = min(inputs)
    start = run.resid[first].unsqueeze(0).expand(rows, -1, -1)
    return run.run_from(first, start, patchers=patchers, positions=[read])[:, 0]
