"""Overflow checks: an intervention that writes inf or NaN raises, naming itself.

::

    with InterventionContext(adapter, [SpectraScaler(layer=5, head=2, alpha=1e38)]):
        adapter.forward("The capital of France is")
    # NonFiniteError: SpectraScaler(layer=5, head=2, alpha=1e+38) overflowed q of layer 5 ...

:class:`FiniteGuard` wraps every edit of a context: it notes, on the device, whether the site
was usable before the edit and is not after (finite, with finite float32 squared norms along
the last axis, so the next norm or dot product works; one reduction each, no host sync).
Edits of queries and keys also have the layer's attention output checked, since scaled scores
can overflow inside the attention while ``q`` itself stays finite. The flags of a whole forward
are read back once, when the forward ends; the first intervention (in forward order) that
turned usable values into unusable ones is named. Values that were already non-finite before an edit
(a model that overflows by itself) are not blamed on the intervention.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from oculi.capture.bridge import LayerTaps
from oculi.errors import NonFiniteError
from oculi.intervention.writers import Edit, Span

SCORE_KINDS = frozenset({"q", "k"})


def usable(x: torch.Tensor) -> torch.Tensor:
    """Finite, and small enough that squares and dot products along the last axis stay finite
    in float32 (what the next norm or attention computes); a 0-dim bool tensor, no sync."""
    return torch.isfinite(x.float().square().sum(-1)).all()


class FiniteGuard:
    """Collects per-edit finiteness flags during a forward; :meth:`check` reads them once."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, list[Any], str]] = []
        self._scores_ok: dict[int, torch.Tensor] = {}  # layer -> q/k finite after the edits

    def wrap(self, edit: Edit) -> Edit:
        """``edit`` with its input and output checked."""
        inner = edit.apply

        def apply(x: torch.Tensor, span: Span) -> None:
            ok_in = usable(x)
            inner(x, span)
            ok_out = usable(x)
            self._pending.append(
                (ok_in & ~ok_out, [edit.owner], f"{edit.kind} of layer {edit.layer}")
            )
            if edit.kind in SCORE_KINDS:
                prev = self._scores_ok.get(edit.layer)
                self._scores_ok[edit.layer] = ok_out if prev is None else prev & ok_out

        return dataclasses.replace(edit, apply=apply)

    def watch_attention(self, taps: dict[int, LayerTaps], edits: list[Edit]) -> None:
        """Check the attention output of every layer whose queries or keys are edited."""
        owners: dict[int, list[Any]] = {}
        for e in edits:
            if e.kind in SCORE_KINDS and e.owner not in owners.setdefault(e.layer, []):
                owners[e.layer].append(e.owner)
        for layer, who in owners.items():

            def tap(z: torch.Tensor, layer: int = layer, who: list[Any] = who) -> None:
                ok_in = self._scores_ok.pop(layer, None)
                if ok_in is not None:
                    bad = ok_in & ~usable(z)
                    self._pending.append((bad, who, f"the attention output of layer {layer}"))

            taps.setdefault(layer, LayerTaps()).z.append(tap)

    def check(self) -> None:
        """Raise :class:`NonFiniteError` for the first edit that overflowed (one host sync)."""
        pending, self._pending = self._pending, []
        self._scores_ok.clear()
        if not pending:
            return
        device = pending[0][0].device
        flags = torch.stack([flag.to(device) for flag, _, _ in pending]).tolist()
        for bad, (_, owners, where) in zip(flags, pending):
            if bad:
                names = " and ".join(repr(o) for o in owners)
                raise NonFiniteError(
                    f"{names} overflowed {where}: it wrote inf or NaN, or values whose squares "
                    "overflow float32 (beyond what the next norm or dot product can compute), "
                    "where the values were finite before; its scale, coefficient or patched "
                    "value is too large; use a smaller one"
                )
