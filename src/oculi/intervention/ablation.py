"""Head ablation: remove one attention head's output.

::

    with InterventionContext(adapter, [HeadAblation(layer=20, head=3)]):
        adapter.generate("Test prompt", max_new_tokens=10)

The ablation acts on ``z``, the head's slice of the output projection's input (its attention
output ``pattern @ v`` before ``o_proj``), so zeroing it equals zeroing that head's input
columns of ``o_proj`` (the projection's bias, which belongs to no head, stays). Methods:

- ``"zero"``: ``z_h = 0``.
- ``"mean"``: ``z_h`` replaced by its mean. By default the mean over the real (non-padding)
  positions of the prompt, per row; in generation it is taken in the prompt pass and kept for
  the generated tokens, so generation with and without the KV cache agree. With
  ``reference=`` (prompts or token ids) it is the mean over every real position of that
  dataset, computed once when the context is entered.
- ``"resample"``: ``z_h`` taken from another prompt (``source=``) at the same positions, which
  needs a source of the same token length. Generated tokens have no source position and keep
  their own ``z_h``.

``positions=`` restricts any method to some prompt positions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch

from oculi.capture.engine import record
from oculi.intervention.base import Binding, Intervention
from oculi.intervention.patch import SiteWrite
from oculi.intervention.state import Position, Session, check_position, resolve_positions
from oculi.intervention.writers import Edit, Span

if TYPE_CHECKING:
    from oculi.capture.inputs import Inputs
    from oculi.models.adapter import Adapter

Method = Literal["zero", "mean", "resample"]


class HeadAblation(Intervention):
    """Ablate head ``head`` of ``layer`` by zeroing, mean-replacing or resampling its ``z``.

    Args:
        layer: layer index (negatives count from the end).
        head: query head index.
        method: ``"zero"``, ``"mean"`` or ``"resample"``.
        reference: for ``"mean"``: prompts or token ids whose mean ``z`` to use (default: the
            current prompt's own positions).
        source: for ``"resample"``: the prompt(s) to take ``z`` from (one row, or one per row
            of the input).
        positions: prompt positions to ablate (default: all).

    Raises:
        ValueError: an unknown method, a missing ``source`` or a misplaced argument; a head
            out of range (on binding); a source whose length differs from the prompt's.
        IndexError: a layer out of range (on binding).
    """

    def __init__(
        self,
        layer: int,
        head: int,
        method: Method = "zero",
        *,
        reference: Inputs | None = None,
        source: Inputs | None = None,
        positions: Position = None,
    ) -> None:
        if method not in ("zero", "mean", "resample"):
            raise ValueError(
                f"HeadAblation: method must be 'zero', 'mean' or 'resample', got {method!r}"
            )
        if method == "resample" and source is None:
            raise ValueError(
                "HeadAblation(method='resample') needs source= (the prompt to take z from)"
            )
        if source is not None and method != "resample":
            raise ValueError(
                f"HeadAblation: source= is only used by method='resample', not {method!r}"
            )
        if reference is not None and method != "mean":
            raise ValueError(
                f"HeadAblation: reference= is only used by method='mean', not {method!r}"
            )
        self.layer, self.head, self.method = layer, head, method
        self.reference, self.source = reference, source
        self.positions = check_position(positions, f"HeadAblation(layer={layer}, head={head})")

    def _repr_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "head": self.head, "method": self.method}
        if self.positions is not None:
            out["positions"] = self.positions
        return out

    def bind(self, adapter: Adapter) -> Binding:
        layer = adapter.resolve_layer(self.layer)
        head = adapter.resolve_head(self.head, "z")
        kw: dict[str, Any] = dict(mode="replace", head=head, position=self.positions, owner=self)
        if self.method == "zero":
            w = SiteWrite(adapter, "z", layer, 0.0, **kw)
            return Binding(edits=[w.edit()], begins=[w.begin])
        if self.method == "mean" and self.reference is None:
            w = _PromptMean(adapter, "z", layer, torch.zeros(adapter.d_head), **kw)
            return Binding(edits=[w.edit()], begins=[w.begin])
        return self._bind_captured(adapter, layer, head, kw)

    def _bind_captured(self, adapter: Adapter, layer: int, head: int, kw: dict) -> Binding:
        """Mean over a reference set, or resampling: values captured when the context opens."""
        holder: dict[str, SiteWrite] = {}
        source_len: dict[str, int] = {}  # "n": the resampling source's token length
        what = repr(self)

        def prepare() -> None:
            inputs = self.reference if self.method == "mean" else self.source
            # resample: __init__ requires source=; mean: bind comes here only with reference=
            assert inputs is not None
            batch = adapter.prepare(inputs)
            z = record(adapter, batch, {"z": (layer,)})["z"][1][:, 0, head]  # [B, T, D]
            if self.method == "mean":
                m = batch.attention_mask.to(z.dtype)[..., None]
                value = (z * m).sum(dim=(0, 1)) / m.sum()
                holder["w"] = SiteWrite(adapter, "z", layer, value, **kw)
                return
            source_len["n"] = z.shape[1]
            value = z
            if self.positions is not None:
                fake = Session(prompt_len=z.shape[1], batch=z.shape[0], mask=None, ids=None)
                cols = resolve_positions(self.positions, fake, [], what)
                value = z[:, cols]
                if isinstance(self.positions, int):
                    value = value[:, 0]
            holder["w"] = SiteWrite(adapter, "z", layer, value, **kw)

        def begin(session: Session) -> None:
            if self.method == "resample" and session.prompt_len != source_len["n"]:
                raise ValueError(
                    f"{what}: the source has {source_len['n']} tokens but the input has "
                    f"{session.prompt_len}; resampling takes z at the same positions, so both "
                    "need the same token length (pad them together, or check for a BOS added "
                    "to one)"
                )
            holder["w"].begin(session)

        def apply(x: torch.Tensor, span: Span) -> None:
            holder["w"].apply(x, span)

        edit = Edit(kind="z", layer=layer, apply=apply, owner=self)
        return Binding(edits=[edit], prepare=prepare, begins=[begin])


class _PromptMean(SiteWrite):
    """``z_h`` replaced by its mean over the prompt's real positions, per row."""

    def _value(self, x: torch.Tensor, span: Span) -> torch.Tensor:
        session = span.frame.session
        key = (self, "mean")
        mean = session.store.get(key)
        if mean is None:
            n = session.prompt_len
            if span.start != 0 or span.length < n:
                raise ValueError(
                    f"{self.what}: the prompt-mean ablation needs the prompt pass, but this "
                    "forward starts from a KV cache filled outside the context; pass "
                    "reference= to ablate with a dataset mean instead"
                )
            z = x[:, self.head, :n]  # [B, n, D]
            if session.mask is None:
                mean = z.mean(dim=1)
            else:
                m = session.mask[:, :n].to(z.dtype)[..., None]
                mean = (z * m).sum(dim=1) / m.sum(dim=1)
            mean = mean[:, None, None, :]  # [B, 1, 1, D]
            session.store[key] = mean
        return mean
