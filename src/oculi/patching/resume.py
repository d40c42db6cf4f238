"""Resumable forward passes: run a model from layer ``l`` on, reusing everything before it.

A patch at layer ``l`` cannot change layers ``0..l-1``. A naive sweep recomputes them for every
patched copy anyway, and then computes logits at every position although the metric reads one.
:class:`ResumableRun` runs the base prompt once, keeping each decoder layer's input and the
exact arguments the model passed to it (attention masks, rotary embeddings, position ids: the
model's own, so nothing of the modeling code is reimplemented). Afterwards
:meth:`ResumableRun.run_from` feeds a batch of new hidden states through layers ``l..L-1`` only,
with optional per-layer hooks for patches inside a layer, and returns the final normalised
residual at the positions asked for. The unembedding is then applied to those positions, and
to the vocabulary rows the metric reads, only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet, StopForward, first_tensor, hidden_arg
from oculi.capture.inputs import Batch
from oculi.capture.interrupts import no_grad
from oculi.capture.unembed import project_logits
from oculi.models.anatomy import get_path

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

# layer -> callable(hooks: HookSet) that registers patches inside that layer (bridges with
# hooks.enter, so the set closes them with its hooks)
LayerPatchers = dict[int, Callable[[HookSet], None]]


def _suffix(value: Any, start: int, t: int) -> Any:
    """A layer call's argument cut to query positions ``start..t-1``.

    Masks ``[B, 1, T, S]`` lose their first ``start`` query rows (all ``S`` keys stay: the
    prefix's keys come from the recorded run), per-position tensors (``position_ids [B, T]``,
    rotary ``(cos, sin) [B, T, D]``, ``cache_position [T]``) their first ``start`` positions.
    Raises ``_NoSuffix`` for a tensor whose layout is not one of these.
    """
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        if value.dim() == 4 and shape[-2:] == (t, t):
            return value[..., start:, :]
        if value.dim() in (2, 3) and shape[1] == t:
            return value[:, start:]
        if value.dim() == 1 and shape[0] == t:
            return value[start:]
        if t in shape:
            raise _NoSuffix(f"a layer argument of shape {shape}")
        return value
    if isinstance(value, tuple):
        return tuple(_suffix(v, start, t) for v in value)
    if isinstance(value, list):
        return [_suffix(v, start, t) for v in value]
    if isinstance(value, dict):
        return {k: _suffix(v, start, t) for k, v in value.items()}
    return value


class _NoSuffix(Exception):
    pass


def _expand(value: Any, n: int) -> Any:
    """Broadcast batch-1 tensors in a layer call's arguments to batch ``n`` (no copy)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == 1 and n != 1:
            return value.expand(n, *value.shape[1:])
        return value
    if isinstance(value, tuple):
        return tuple(_expand(v, n) for v in value)
    if isinstance(value, list):
        return [_expand(v, n) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, n) for k, v in value.items()}
    return value


class ResumableRun:
    """One recorded forward of a single prompt, resumable from any layer.

    Args:
        adapter: the model's adapter.
        batch: a single-row batch (``B == 1``).
        embed_hook: optional ``fn(embeddings [1, T, d]) -> embeddings`` applied to the
            embedding output (causal tracing's noise).

    Attributes:
        resid: ``[L + 1, T, d]``: each layer's input, then the last layer's output.
        calls: each layer's ``(args, kwargs)`` with the hidden states removed.
    """

    def __init__(self, adapter: Adapter, batch: Batch, embed_hook: Callable | None = None):
        if batch.input_ids.shape[0] != 1:
            raise ValueError("ResumableRun takes one prompt (a batch of 1)")
        self.adapter = adapter
        self.batch = batch
        n = adapter.n_layers
        self.calls: list[tuple[tuple, dict]] = [((), {})] * n
        resid: list[torch.Tensor | None] = [None] * (n + 1)
        # each layer's post-RoPE keys and values, as its attention function received them
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n

        def keep(store: list, i: int):
            def tap(x: torch.Tensor) -> None:
                store[i] = x.detach()

            return tap

        taps = {i: LayerTaps(k=[keep(self.keys, i)], v=[keep(self.values, i)]) for i in range(n)}

        def pre(i: int):
            def hook(_m, args, kwargs):
                resid[i] = hidden_arg(args, kwargs).detach()
                rest = args[1:] if args else ()
                kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.calls[i] = (rest, kw)

            return hook

        def last(_m, _a, output):
            resid[n] = first_tensor(output).detach()
            raise StopForward

        with no_grad(), HookSet() as hooks:
            for i, layer in enumerate(adapter.layer_modules):
                hooks.forward_pre_kwargs(layer, pre(i))
            hooks.forward(adapter.layer_modules[-1], last)
            if embed_hook is not None:
                embed = get_path(adapter.model, adapter.anatomy.embed)
                hooks.forward(embed, lambda _m, _a, out: embed_hook(out))
            # Under the bridge the model builds explicit (eager) masks, which every attention
            # implementation accepts when the layers are re-run, patched or not.
            try:
                with attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps):
                    adapter.decoder(**batch.model_kwargs(), use_cache=False)
            except StopForward:
                pass
        self.resid = torch.cat([r for r in resid if r is not None])  # [L+1, T, d]
        last_real = int(batch.attention_mask[0].nonzero().max())
        self.last_position = last_real

    def position(self, relative: int) -> int:
        """Absolute index of a position given relative to the real tokens (-1: last)."""
        real = self.batch.attention_mask[0].nonzero()[:, 0].tolist()
        return real[relative]

    def run_from(
        self,
        layer: int,
        hidden: torch.Tensor,
        *,
        patchers: LayerPatchers | None = None,
        positions: Sequence[int] | None = None,
        stop_after: int | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """Run layers ``layer..L-1`` on ``hidden [P, T, d]``; return the final-normed residual.

        Args:
            layer: the first layer to run; ``hidden`` is its input.
            hidden: ``[P, T, d]`` (P patched copies of the prompt), or ``[P, T - start, d]``
                with ``start``.
            patchers: per layer, a function registering hooks for patches inside it (with
                ``start``, they see tensors of the last ``T - start`` positions).
            positions: positions to return, absolute (default: all run).
            stop_after: run only up to and including this layer and return its raw output.
            start: run only positions ``start..T-1``: the copies must equal the recorded run
                before ``start`` (a patch at position ``p`` cannot change earlier positions),
                whose keys and values are then taken from the recording instead of recomputed.

        Returns:
            ``[P, len(positions), d]`` after the final norm (or the raw residual with
            ``stop_after``).
        """
        adapter = self.adapter
        patchers = patchers or {}
        end = adapter.n_layers if stop_after is None else stop_after + 1
        h = hidden
        calls = self.calls
        t = self.resid.shape[1]
        if start:
            calls = [_suffix(c, start, t) for c in self.calls]
            taps = {i: self._prefix_taps(i, start) for i in range(layer, end)}
            prefix: Any = attention_bridge(
                adapter.attention_configs, adapter.attention_layer_ids, taps
            )
        else:
            prefix = nullcontext()
        with prefix:
            h = self._run_layers(layer, end, h, calls, patchers)
        if stop_after is not None:
            return h
        if positions is not None:
            h = h[:, [p - start for p in positions]]
        with no_grad():
            norm = get_path(adapter.model, adapter.anatomy.final_norm)
            return norm(h)

    def can_start_late(self) -> bool:
        """Whether :meth:`run_from` can skip positions (every layer argument has a known layout)."""
        t = self.resid.shape[1]
        try:
            for c in self.calls:
                _suffix(c, 1, t)
        except _NoSuffix:
            return False
        return all(k is not None for k in self.keys) and all(v is not None for v in self.values)

    def _prefix_taps(self, layer: int, start: int) -> LayerTaps:
        keys, values = self.keys[layer], self.values[layer]
        assert keys is not None and values is not None

        def prepend(cached: torch.Tensor):
            head = cached[:, :, :start]

            def tap(x: torch.Tensor) -> torch.Tensor:
                return torch.cat([head.expand(x.shape[0], -1, -1, -1).to(x.dtype), x], dim=2)

            return tap

        return LayerTaps(k=[prepend(keys)], v=[prepend(values)])

    def _run_layers(self, layer: int, end: int, h: torch.Tensor, calls, patchers) -> torch.Tensor:
        adapter = self.adapter
        n = h.shape[0]
        with no_grad():
            for i in range(layer, end):
                args, kwargs = calls[i]
                call_args, call_kwargs = _expand(args, n), _expand(kwargs, n)
                module = adapter.layer_modules[i]
                if i in patchers:
                    with HookSet() as hooks:
                        patchers[i](hooks)
                        h = first_tensor(module(h, *call_args, **call_kwargs))
                else:
                    h = first_tensor(module(h, *call_args, **call_kwargs))
        return h


def unembed(adapter: Adapter, normed: torch.Tensor, columns: Sequence[int] | None) -> torch.Tensor:
    """Logits ``[..., V]`` or ``[..., len(columns)]`` from final-normed residuals."""
    w, bias, cap = adapter.unembedding()
    if columns is not None:
        idx = torch.as_tensor(list(columns)).to(w.device, non_blocking=True)
        w = w[idx]
        bias = bias[idx] if bias is not None else None
    return project_logits(normed, w, bias, cap)


# A copy joining a joined run: (layer it enters, index of its base run, hidden [n, T', d]).
Join = tuple[int, int, torch.Tensor]


def run_joined(
    runs: Sequence[ResumableRun],
    joins: Sequence[Join],
    *,
    patchers: LayerPatchers | None = None,
    position: int | None = None,
    start: int = 0,
    stop_after: int | None = None,
) -> torch.Tensor:
    """Copies that enter at different layers, run as one growing batch; ``[N, d]`` at ``position``.

    The fused form of :meth:`ResumableRun.run_from` for GPUs, where the cost of a sweep is the
    number of layer calls rather than FLOPs: the copies patched at layer ``l`` join the batch
    at layer ``l`` (before it, they equal their base run), so a sweep over every layer makes
    ``L`` layer calls instead of ``L²/2``. Rows keep the order of ``joins``; the batch at layer
    ``i`` holds every copy that joined at or before ``i``, so a patcher for layer ``i`` indexes
    rows by their final position.

    Args:
        runs: base runs of the same prompt (the same layer arguments), e.g. noise samples.
        joins: ``(layer, run index, hidden [n, T - start, d])``, sorted by layer.
        patchers: per layer, hooks for patches inside it (row indices as in the final batch).
        position: the absolute position whose final-normed residual is returned.
        stop_after: run only up to and including this layer and return its raw output for
            every row joined by then, ``[n, T - start, d]``.
        start: run positions ``start..T-1`` only; keys and values before ``start`` come from
            each row's base run (every copy must equal its base run before ``start``).
    """
    base = runs[0]
    adapter = base.adapter
    patchers = patchers or {}
    t = base.resid.shape[1]
    calls = [_suffix(c, start, t) for c in base.calls] if start else base.calls
    order = [r for _, r, hidden in joins for _ in range(hidden.shape[0])]
    # built on the host and sent without waiting for the device's queue
    row_run = torch.tensor(order).to(base.resid.device, non_blocking=True)
    first = joins[0][0]
    prefix: Any = nullcontext()
    if start:
        taps = {i: _joined_prefix_taps(runs, i, start, row_run) for i in range(first, len(calls))}
        prefix = attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
    with prefix, no_grad():
        h: torch.Tensor | None = None
        pending = list(joins)
        end = adapter.n_layers if stop_after is None else stop_after + 1
        for i in range(first, end):
            entering = [hidden for layer, _, hidden in pending if layer == i]
            pending = [j for j in pending if j[0] != i]
            if entering:
                h = torch.cat([h, *entering] if h is not None else entering)
            assert h is not None  # the first join enters at `first`
            h = base._run_layers(i, i + 1, h, calls, patchers)
        if stop_after is not None:
            assert h is not None
            return h
        assert position is not None, "run_joined needs a position or stop_after"
        # copies patched after the last layer (resid_post of it): their input is the output
        h = torch.cat([x for x in [h, *(hidden for _, _, hidden in pending)] if x is not None])
        norm = get_path(adapter.model, adapter.anatomy.final_norm)
        return norm(h[:, position - start])


def _joined_prefix_taps(
    runs: Sequence[ResumableRun], layer: int, start: int, row_run: torch.Tensor
) -> LayerTaps:
    """Taps prepending each row's base-run keys/values before ``start`` (see ``run_joined``)."""

    def prepend(cached: list[torch.Tensor | None]):
        parts = [c[:, :, :start] for c in cached if c is not None]
        heads = torch.cat(parts)  # [R, H_kv, start, D]

        def tap(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            head = heads.expand(n, -1, -1, -1) if len(parts) == 1 else heads[row_run[:n]]
            return torch.cat([head.to(x.dtype), x], dim=2)

        return tap

    keys = [r.keys[layer] for r in runs]
    values = [r.values[layer] for r in runs]
    return LayerTaps(k=[prepend(keys)], v=[prepend(values)])
