"""Per-row writers: hooks that overwrite one site in chosen rows of a batched forward.

A sweep runs many patched copies of one prompt as a batch; row ``r`` carries its own patch
(a position, a head, or the whole site). :func:`patchers_for` returns, for the patched layer,
a function that registers the hook (a module hook, or an attention-bridge tap, where the site's
locator in :mod:`oculi.capture.places` says) doing exactly those writes while that layer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet
from oculi.capture.places import add_replacer
from oculi.capture.sites import SITE_KINDS, WRITABLE, SiteKind, check_kind
from oculi.errors import InputError

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


@dataclass(frozen=True)
class PatchSpec:
    """Row ``row`` gets the clean value at ``position`` (None: all) and ``head`` (None: all)."""

    row: int
    position: int | None = None
    head: int | None = None


def _sel(v: int | None) -> Any:
    return slice(None) if v is None else v


def offset_index(position: int | None, offset: int) -> tuple[Any, Any]:
    """Index of ``position`` in a tensor of the last ``T - offset`` positions, and in ``clean``."""
    if position is None:
        return slice(None), slice(offset, None)
    return position - offset, position


def check_patchable(adapter: Adapter, site: str) -> SiteKind:
    """The :class:`SiteKind` of ``site`` if patching can write it in this model, else an error.

    Raises:
        UnknownSiteError: not a site kind.
        InputError: a site without a tensor of its own (``head_out``), one this model lacks
            (``mlp_gate`` of a plain MLP), or ``resid_mid`` of a parallel-attention model.
    """
    kind = check_kind(site)
    loc = kind.locate(adapter)
    if loc.write is None:
        raise InputError(
            f"site {site!r} cannot be patched: {loc.readonly or loc.absent} "
            f"(patchable sites: {', '.join(WRITABLE)})"
        )
    if loc.read is None and loc.write.plus_input:
        raise InputError(
            "resid_mid is not a state of parallel-attention models (attention and MLP read the "
            "same input); patch attn_out or resid_pre instead"
        )
    return kind


def _write(
    x: torch.Tensor, clean: torch.Tensor, specs: list[PatchSpec], offset: int, per_head: bool
) -> None:
    """Write rows' positions (and heads) of ``clean`` into the site ``x`` in place.

    ``x`` is ``[B, T', ·]`` or, per head, ``[B, H, T', ·]``; ``clean`` the same without the
    batch axis and with all ``T`` positions.
    """
    for s in specs:
        at, src = offset_index(s.position, offset)
        if per_head:
            h = _sel(s.head)
            x[s.row, h, at] = clean[h, src].to(x.dtype)
        else:
            x[s.row, at] = clean[src].to(x.dtype)


def patchers_for(
    adapter: Adapter,
    site: str,
    layer: int,
    clean: torch.Tensor,
    specs: list[PatchSpec],
    resid_in: torch.Tensor,
    offset: int = 0,
) -> dict[int, Callable[[HookSet], None]]:
    """Hooks writing ``clean`` into ``site`` of ``layer`` for each spec's row.

    The site is written where its locator says (:mod:`oculi.capture.places`).

    Args:
        clean: the clean activation of the site at this layer, without the batch dim.
        resid_in: the layer's input residual ``[T, d]`` of the run being patched (for
            ``resid_mid``, patched through the attention output so that both the MLP input
            and the residual carried past the MLP change).
        offset: the forward runs positions ``offset..T-1`` only (see
            :meth:`~oculi.patching.resume.ResumableRun.run_from`'s ``start``); keys and
            values still span all ``T`` positions there, the recorded prefix first.
    """
    loc = check_kind(site).locate(adapter)
    place = loc.write
    if place is None:
        raise ValueError(f"site {site!r} has no writer: {loc.readonly or loc.absent}")
    target = clean
    if place.plus_input:  # resid_mid: the attention branch's output becomes clean - input
        target = clean - resid_in.to(clean.dtype)
        place = replace(place, plus_input=False)
    per_head = SITE_KINDS[site].per_head
    at = 0 if place.cached else offset  # keys and values arrive with the prefix prepended
    view = place.view

    def write(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        _write(view(out) if view else out, target, specs, at, per_head)
        return out

    def register(hooks: HookSet) -> None:
        taps: dict[int, LayerTaps] = {}
        add_replacer(hooks, taps, adapter, layer, place, write)
        if taps:
            hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
            )

    return {layer: register}
