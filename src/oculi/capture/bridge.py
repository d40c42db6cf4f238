"""The attention bridge: oculi's own function in transformers' ``AttentionInterface``.

Every Hugging Face attention module computes its post-RoPE queries, keys and values and then
calls ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask, ...)``.
While a bridge is active, oculi sets that implementation to ``"oculi"``, so each layer's call
lands in :func:`_bridge_attention` with::

    query [B, H, T, D]   key/value [B, H_kv, S, D]   (post-RoPE, S includes any KV cache)

Per layer, *taps* may read or replace ``q``, ``k``, ``v``, the ``pattern`` and the output ``z``
``[B, T, H, D]``. Layers without taps, and layers whose taps don't need the pattern, defer to
the model's original implementation (sdpa, eager, ...). Layers that read the pattern run the
family's own ``eager_attention_forward`` (the code behind ``output_attentions``), so captured
patterns are the model's, soft-capping, sliding windows and scaling included. Layers that
*replace* the pattern or scale scores use :func:`eager_attention`, a plain reimplementation.

The mask: a name registered in ``AttentionInterface`` must also be registered in
``AttentionMaskInterface``, or transformers builds no mask and attention silently turns
bidirectional. oculi registers the eager (additive float) mask builder, which every
implementation accepts and which already folds in padding and sliding windows.

Long contexts: a bridge opened with ``rows=`` runs every layer's attention (tapped or not) a
block of query positions at a time (:mod:`oculi.capture.blocked`), so no layer materialises
``[B, H, T, S]`` scores; while it is open the mask builder returns sdpa's boolean mask (a
quarter of the float one in float32) and each block gets its rows. Pattern readers that take
blocks (``LayerTaps.pattern_rows``) see the pattern ``[B, H, r, S]`` one block at a time; taps
that edit scores or patterns, or read whole patterns, get the whole layer as before.

Ownership: the switch is global to the model, so one :class:`_Owner` per model holds it. Every
bridge registers with the owner; the first switches the configs to ``"oculi"``, the last one to
close (in whatever order they close) restores the implementations it found. Taps are scoped to
the thread and ``contextvars`` context that opened their bridge: a forward in a thread with no
bridge of its own finds none and runs the model's own implementation. Opening and closing are
all-or-nothing, also against Ctrl-C (:mod:`oculi.capture.interrupts`): after any bridge closes
the module tables hold no entry of it, and the last one leaves no owner behind.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oculi.capture.blocked import (
    RowTap,
    family_eager,
)
from oculi.capture.blocked import additive_mask as _additive
from oculi.capture.blocked import run_attention as _run
from oculi.capture.interrupts import Errors, closed, opened, protected, raise_held

IMPL_NAME = "oculi"

# tap(layer, tensor) -> replacement tensor or None (read only)
Tap = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass
class LayerTaps:
    """What happens inside one layer's attention call."""

    q: list[Tap] = field(default_factory=list)
    k: list[Tap] = field(default_factory=list)
    v: list[Tap] = field(default_factory=list)
    scores: list[Tap] = field(default_factory=list)  # pre-softmax [B, H, T, S], edits only
    # pre-softmax [B, H, T, S] with the mask added (masked entries hold the dtype's minimum)
    masked_scores: list[Tap] = field(default_factory=list)
    pattern: list[Tap] = field(default_factory=list)  # [B, H, T, S]
    pattern_edits: bool = False
    z: list[Tap] = field(default_factory=list)  # [B, T, H, D]
    # read only, one block of query rows at a time: tap(r0, pattern[B, H, r, S])
    pattern_rows: list[RowTap] = field(default_factory=list)

    def merged_with(self, other: LayerTaps) -> LayerTaps:
        """These taps followed by ``other``'s."""
        return LayerTaps(
            q=self.q + other.q,
            k=self.k + other.k,
            v=self.v + other.v,
            scores=self.scores + other.scores,
            masked_scores=self.masked_scores + other.masked_scores,
            pattern=self.pattern + other.pattern,
            pattern_edits=self.pattern_edits or other.pattern_edits,
            z=self.z + other.z,
            pattern_rows=self.pattern_rows + other.pattern_rows,
        )


@dataclass(eq=False)
class BridgeState:
    layer_of: dict[int, int]  # id(attention module) -> layer index
    taps: dict[int, LayerTaps]
    fallback: str  # the model's own implementation name
    configs: list[Any] = field(default_factory=list)  # what the switch is set on
    live: bool = True
    seen: set[int] = field(default_factory=set)  # tapped layers whose attention call came here
    rows: int | None = None  # query rows per block: every layer runs blocked (long contexts)

    def check_switched(self) -> None:
        """Before a forward: raise if the configs no longer route attention to the bridge."""
        names = {c._attn_implementation for c in self.configs}
        if names - {IMPL_NAME}:
            raise RuntimeError(_SWITCHED.format(what=f"now reads {sorted(names)}"))

    def check_routed(self, layers: Iterable[int]) -> None:
        """After a forward: raise if a tapped layer's attention did not come through the
        bridge (the implementation was switched away from ``"oculi"`` during it)."""
        missed = sorted(set(layers) - self.seen)
        self.seen.clear()
        if missed:
            raise RuntimeError(
                _SWITCHED.format(what=f"was left by the attention of layers {missed}")
            )


_SWITCHED = (
    "the model's attention implementation was changed (set_attn_implementation?) while an "
    "oculi capture or intervention context was open: the bridge its taps run in {what}, so "
    "they would not run; change it only when no oculi context is open"
)


@dataclass(eq=False)
class _Owner:
    """The one owner of a model's attention switch: every open bridge on it registers here."""

    configs: list[Any]
    originals: list[str]
    fallback: str
    modules: list[int]
    count: int = 0


# Every open bridge, all threads together (for inspection; dispatch reads _OPEN).
_ACTIVE: list[BridgeState] = []
# The bridges open in the current thread / contextvars context, in the order they opened.
_OPEN: ContextVar[tuple[BridgeState, ...]] = ContextVar("oculi_open_bridges", default=())
_OWNERS: dict[int, _Owner] = {}  # id(first config) -> owner, while any bridge is open
_FALLBACK_OF: dict[int, str] = {}  # id(attention module) -> its model's own implementation
_LOCK = threading.Lock()
_REGISTERED = False


def _register_once() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL_NAME, _bridge_attention)
    AttentionMaskInterface.register(IMPL_NAME, _bridge_mask)
    _REGISTERED = True


def _blocked_rows() -> int | None:
    """Query rows per block of the blocked bridges open in this context (the smallest), or
    ``None`` when none is blocked."""
    rows = [s.rows for s in _OPEN.get() if s.live and s.rows]
    return min(rows) if rows else None


def _bridge_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask for ``"oculi"``: transformers' eager (additive float) mask, or while a blocked
    bridge is open in this context, the same mask as booleans (``True``: attended)."""
    from transformers.masking_utils import eager_mask, sdpa_mask

    if _blocked_rows():
        kwargs.pop("dtype", None)
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False})
    return eager_mask(*args, **kwargs)


@protected
def _acquire(configs: list[Any], layer_of: dict[int, int]) -> _Owner:
    """Register one bridge with the model's owner; the first one switches to ``"oculi"``.

    All or nothing: if a config refuses the switch, the ones already switched get their
    implementation back and no owner is left registered.
    """
    with _LOCK:
        owner = _OWNERS.get(id(configs[0]))
        if owner is None:
            originals = [c._attn_implementation for c in configs]
            fallback = originals[0] if originals[0] in ("eager", "sdpa") else "sdpa"
            owner = _Owner(list(configs), originals, fallback, list(layer_of))
            try:
                for c in configs:
                    c._attn_implementation = IMPL_NAME
            except BaseException:
                _restore(owner)
                raise
            for m in owner.modules:
                _FALLBACK_OF[m] = fallback
            _OWNERS[id(configs[0])] = owner
        owner.count += 1
        return owner


@protected
def _release(owner: _Owner) -> None:
    """Unregister one bridge; the last one restores the model's implementation exactly.

    The owner's table entries go first, so a config that refuses its value back (the first
    such error is raised after every other config is restored) leaves no stale owner.
    """
    with _LOCK:
        owner.count -= 1
        if owner.count > 0:
            return
        if _OWNERS.get(id(owner.configs[0])) is owner:
            del _OWNERS[id(owner.configs[0])]
        for m in owner.modules:
            _FALLBACK_OF.pop(m, None)
        _restore(owner)


def _restore(owner: _Owner) -> None:
    errors = Errors()
    for c, name in zip(owner.configs, owner.originals):
        if c._attn_implementation == IMPL_NAME:  # else its user set it meanwhile: theirs

            def put_back(c: Any = c, name: str = name) -> None:
                c._attn_implementation = name

            errors.run(put_back)
    errors.raise_first()


def _taps_for(module: nn.Module) -> tuple[str, LayerTaps | None] | None:
    """The fallback implementation and the merged taps of this context's bridges for ``module``.

    Bridges nest (a capture inside an intervention context): taps of bridges opened earlier
    run first, so a capture records what the intervened model computes. Bridges of other
    threads are invisible here.
    """
    merged: LayerTaps | None = None
    fallback = None
    for state in _OPEN.get():
        if not state.live:  # closed from another context
            continue
        layer = state.layer_of.get(id(module))
        if layer is None:
            continue
        fallback = fallback or state.fallback
        taps = state.taps.get(layer)
        if taps is None:
            continue
        state.seen.add(layer)
        merged = taps if merged is None else merged.merged_with(taps)
    return None if fallback is None else (fallback, merged)


def _apply(taps: list[Tap], tensor: torch.Tensor) -> torch.Tensor:
    for tap in taps:
        out = tap(tensor)
        if out is not None:
            tensor = out
    return tensor


def _bridge_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    found = _taps_for(module)
    rows = _blocked_rows()
    if found is None:
        # No bridge of this thread taps the module (another thread switched the model, or a
        # plain forward beside a capture): the model's own implementation. The mask was built
        # for either name; the eager (additive) mask and sdpa's both work with either.
        name = _FALLBACK_OF.get(id(module), "sdpa")
        return _run(module, name, query, key, value, attention_mask, rows, **kwargs)
    fallback, taps = found
    if taps is None:
        return _run(module, fallback, query, key, value, attention_mask, rows, **kwargs)

    query = _apply(taps.q, query)
    key = _apply(taps.k, key)
    value = _apply(taps.v, value)
    weights: torch.Tensor | None
    if taps.pattern_edits or taps.scores or taps.masked_scores:
        mask = _additive(attention_mask, query)
        out, weights = eager_attention(module, query, key, value, mask, taps=taps, **kwargs)
        for tap in taps.pattern_rows:
            tap(0, weights)
    elif taps.pattern:
        mask = _additive(attention_mask, query)
        out, weights = family_eager(module)(module, query, key, value, mask, **kwargs)
        _apply(taps.pattern, weights)
        for tap in taps.pattern_rows:
            tap(0, weights)
    else:
        out, weights = _run(
            module, fallback, query, key, value, attention_mask, rows, taps.pattern_rows, **kwargs
        )
    out = _apply(taps.z, out)
    return out, weights


def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, H_kv, S, D]`` -> ``[B, H_kv * n_rep, S, D]`` (each KV head serves ``n_rep`` heads)."""
    if n_rep == 1:
        return states
    b, h_kv, s, d = states.shape
    return states[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    taps: LayerTaps | None = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention with taps on the scores and the pattern.

    ``scores = q k^T * scaling``, soft-capped as ``cap * tanh(scores / cap)`` when the layer
    has a cap, plus the additive mask, softmax in float32. Returns ``z [B, T, H, D]`` and the
    pattern ``[B, H, T, S]``.
    """
    n_rep = query.shape[1] // key.shape[1]
    key = repeat_kv(key, n_rep)
    value = repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if taps is not None:
        scores = _apply(taps.scores, scores)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    elif getattr(module, "is_causal", True) and scores.shape[-2] > 1:
        # sdpa's mask builder may return None and rely on is_causal; queries are the last T
        # of the S key positions.
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    if taps is not None:
        scores = _apply(taps.masked_scores, scores)
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if taps is not None:
        pattern = _apply(taps.pattern, pattern)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


class attention_bridge:  # noqa: N801 - a context manager used like the function it was
    """Route the model's attention through oculi while the block runs; always restore it.

    ::

        with attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps) as state:
            model(ids)
            state.check_routed(taps)   # every tapped layer's attention came through the bridge

    The taps apply only in the thread (and ``contextvars`` context) that opened the bridge.
    Bridges on one model may close in any order: the configs say ``"oculi"`` while any is
    open and get their own implementation back exactly when the last one closes.

    Args:
        configs: the config objects whose ``_attn_implementation`` the attention modules read.
        layer_of: ``id(attention module) -> layer index``.
        taps: per-layer taps; layers without an entry run the original implementation.
        rows: run every layer's attention by blocks of this many query positions (long
            contexts; the module docstring says how), or ``None``.

    ``__enter__`` returns the bridge's :class:`BridgeState`; ``state.check_routed(layers)``
    after a forward confirms that the taps of ``layers`` ran.
    """

    def __init__(
        self,
        configs: list[Any],
        layer_of: dict[int, int],
        taps: dict[int, LayerTaps],
        *,
        rows: int | None = None,
    ) -> None:
        self._args = (configs, layer_of, taps)
        self._rows = rows
        self._owner: _Owner | None = None
        self._state: BridgeState | None = None
        self._opened = False

    @protected
    def __enter__(self) -> BridgeState:
        if self._owner is not None:
            raise RuntimeError("this attention bridge is already open")
        self._opened = opened()
        try:
            configs, layer_of, taps = self._args
            _register_once()
            self._owner = _acquire(configs, layer_of)
            state = BridgeState(
                layer_of, taps, self._owner.fallback, configs=self._owner.configs, rows=self._rows
            )
            self._state = state
            with _LOCK:
                _ACTIVE.append(state)
            _OPEN.set((*_OPEN.get(), state))
            raise_held()
        except BaseException:
            self._close()
            raise
        return state

    @protected
    def __exit__(self, *exc: object) -> None:
        self._close()
        raise_held()

    @protected
    def _close(self) -> None:
        state, owner, counted = self._state, self._owner, self._opened
        self._state, self._owner, self._opened = None, None, False
        errors = Errors()
        if state is not None:
            state.live = False
            errors.run(lambda: _forget(state))
        if owner is not None:
            errors.run(lambda: _release(owner))
        errors.run(lambda: closed(counted))
        errors.raise_first()


def _forget(state: BridgeState) -> None:
    """Drop ``state`` from this context's open bridges and from the table of all of them."""
    _OPEN.set(tuple(s for s in _OPEN.get() if s is not state))
    with _LOCK:
        if any(s is state for s in _ACTIVE):
            _ACTIVE.remove(state)
