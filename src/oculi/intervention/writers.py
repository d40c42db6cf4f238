"""Writers: the hooks that change a site, one place per site kind.

The capture engine (:mod:`oculi.capture.engine`) *reads* each site kind from one module hook or
attention-bridge tap; this module *writes* the places the same locators name
(:mod:`oculi.capture.places`), so a capture taken inside an intervention context records
exactly what the intervened model computed. Every intervention
reduces to :class:`Edit` s, and :func:`install` registers one hook per ``(layer, kind)`` that
hands each edit the site in its capture layout:

- ``[B, T, W]`` for residual and MLP sites (``W`` = ``d_model`` or ``d_mlp``),
- ``[B, H, T, D]`` for ``q``, ``z``, ``q_pre``; ``[B, H_kv, S, D]`` for ``k``, ``v``, ``k_pre``,
- ``[B, H, T, S]`` for ``pattern``.

The position axis is always ``-2``. The tensor is a private copy: edits change it in place and
the hook hands it on. :class:`Span` says which absolute columns the position axis covers (see
:mod:`oculi.intervention.state`): ``offset .. offset+T-1`` for most sites, and for keys and
values the columns the attention call sees, cached ones included. Cached keys and values are
stored unedited, so an edit to them is applied again at every step; the result equals a
forward without the cache.

Two sites need care:

- ``resid_mid`` is ``resid_pre + attn_out`` (the residual after attention is added). Writing
  the pre-MLP norm's input would change what the MLP reads but not the residual carried past
  it, so the writer adds the change to the attention branch's output instead: both the MLP
  input and the carried residual then see it. For parallel families (GPT-NeoX with
  ``use_parallel_residual``) the MLP reads the block input, so a ``resid_mid`` write changes
  only the residual, consistent with ``resid_mid`` being defined as ``x + attn_out`` there.
- ``attn_in`` of a family without a pre-attention norm (OLMo 2) is written at the attention
  module's input; the capture engine reads it at the block input, which the write leaves
  alone.

``head_out`` (each head's share of the residual) is derived from ``z`` and has no tensor of its
own to write; patch ``z`` with ``head=`` instead, or ``attn_out``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.bridge import LayerTaps
from oculi.capture.hooks import HookSet
from oculi.capture.places import Place, add_replacer, locate
from oculi.capture.sites import MODULE_KINDS, SITE_KINDS, check_kind
from oculi.intervention.state import Frame, Tracker

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


@dataclass
class Span:
    """The absolute columns ``start .. start + length - 1`` that a site's position axis holds."""

    start: int
    length: int
    frame: Frame


@dataclass
class Edit:
    """One change to one site of one layer.

    Attributes:
        kind: the site kind.
        layer: the layer (non-negative).
        apply: ``apply(x, span)`` changes ``x`` (the site in capture layout, a private copy)
            in place.
        owner: the intervention it belongs to (for effect checks).
    """

    kind: str
    layer: int
    apply: Callable[[torch.Tensor, Span], None]
    owner: Any


Report = Callable[[Any, bool], None]


def check_writable(adapter: Adapter, kind: str, what: str) -> str:
    """``kind`` if oculi can write it for this model, else a ``ValueError`` / ``KeyError``."""
    loc = (MODULE_KINDS[kind] if kind in MODULE_KINDS else check_kind(kind)).locate(adapter)
    if loc.write is None:
        raise ValueError(f"{what}: {loc.readonly or loc.absent}")
    return kind


class _Runner:
    """Applies a list of edits to one site tensor, reporting effects when asked."""

    def __init__(self, edits: list[Edit], tracker: Tracker, report: Report | None) -> None:
        self.edits = edits
        self.tracker = tracker
        self.report = report

    def __call__(self, x: torch.Tensor, start: int | None = None) -> None:
        frame = self.tracker.current()
        if start is None:
            start = frame.offset
        span = Span(start=start, length=int(x.shape[-2]), frame=frame)
        for edit in self.edits:
            if self.report is None:
                edit.apply(x, span)
                continue
            before = x.clone()
            edit.apply(x, span)
            self.report(edit.owner, not torch.equal(before, x))


def _kv_start(frame: Frame, s: int) -> int:
    """First absolute column of a key/value tensor with ``s`` columns.

    A dynamic cache returns past plus new columns, ending at the newest one (a sliding-window
    layer keeps only the window's tail); a static cache returns its whole buffer from 0.
    """
    end = frame.offset + frame.length
    return end - s if s <= end else 0


def install(
    adapter: Adapter,
    hooks: HookSet,
    taps: dict[int, LayerTaps],
    edits: Iterable[Edit],
    tracker: Tracker,
    report: Report | None = None,
) -> None:
    """Register the hooks and taps that apply ``edits`` (in order per site) in every forward.

    Each site is written where its locator (:mod:`oculi.capture.places`) says. ``hooks`` must
    be an active :class:`HookSet`; bridge taps go into ``taps``, which the caller activates
    with :func:`oculi.capture.bridge.attention_bridge` when it is non-empty.
    """
    grouped: dict[tuple[int, str], list[Edit]] = {}
    for e in edits:
        grouped.setdefault((e.layer, e.kind), []).append(e)
    order: dict[str, float] = {k: i for i, k in enumerate(SITE_KINDS)}
    # a branch's own output comes just before its output norm's (module paths' kinds)
    order.update(o_out=order["attn_out"] - 0.5, mlp_result=order["mlp_out"] - 0.5)
    # SITE_KINDS order within a layer: a resid_mid writer keeps the edited resid_pre
    for layer, kind in sorted(grouped, key=lambda lk: (lk[0], order[lk[1]])):
        place = locate(kind, adapter).write
        if place is None:  # pragma: no cover - check_writable refuses these
            raise ValueError(f"site {kind!r} cannot be written")
        run = _Runner(grouped[(layer, kind)], tracker, report)
        add_replacer(hooks, taps, adapter, layer, place, _editor(place, run))


def _editor(place: Place, run: _Runner) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> `` a copy of ``x`` with the edits applied to its site view."""
    view = place.view

    def edit(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        site = view(out) if view else out
        if place.cached:  # keys and values: the columns the attention call sees
            run(site, _kv_start(run.tracker.current(), int(site.shape[-2])))
        else:
            run(site)
        return out

    return edit
