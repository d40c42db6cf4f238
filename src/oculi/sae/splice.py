"""Splicing an SAE into the forward pass, and editing its latents, as an intervention.

::

    with InterventionContext(adapter, [SAEPatch(sae)]):                 # site := x̂
        adapter.forward(prompt)
    with InterventionContext(adapter, [SAEPatch(sae, error=True, ablate=[12, 40])]):
        adapter.generate(prompt, max_new_tokens=20)                     # KV cache on
    patch = SAEPatch(sae, error=True, steer={7: 8.0}, record=True)
    with InterventionContext(adapter, [patch]):
        adapter.forward(prompt)
    patch.recorded[0]                                                   # [B, T, d_sae]

At the SAE's site (``sae.site`` of ``sae.layer``) the activation ``x`` is encoded, ``a =
encode(x)``; the latent edits give ``a'`` (``ablate``: ``a_i := 0``; ``clamp``: ``a_i := v``;
``steer``: ``a_i += c``); and the site (``sae.write_site`` for a transcoder) becomes

- ``error=False``: ``decode(a')``, the SAE's reconstruction: the model runs on what the SAE
  explains;
- ``error=True``: ``x + (a' - a) @ W_dec``, which is ``decode(a') + (x - decode(a))``: the
  reconstruction plus the SAE's error term, so without edits the model is untouched (bit for
  bit: nothing is added), and an edit changes the activation by exactly what it changes in
  the reconstruction (``-a_i · W_dec[i]`` to ablate, ``+c · W_dec[i]`` to steer).

``positions`` (prompt columns) and ``steps`` (generation steps; 0 is the prompt pass) select
where, as for :class:`~oculi.intervention.SteeringVector`. ``record=True`` keeps ``a`` (before
edits, detached) of every forward in ``patch.recorded``: one ``[B, P, d_sae]`` tensor per
forward, so the prompt pass and then one per generated token with the KV cache.

A transcoder reads ``site`` and writes ``write_site`` of the same layer: the read is a hook
that changes nothing and keeps its input for the write, which comes later in the layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from oculi.intervention.base import Binding, Intervention, check_number
from oculi.intervention.patch import SiteWrite
from oculi.intervention.state import Position, Steps, check_position, check_steps
from oculi.intervention.writers import Edit, Span
from oculi.sae.model import SAE

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def _indices(latents: Any, sae: SAE, name: str) -> list[int]:
    if latents is None:
        return []
    if isinstance(latents, int) and not isinstance(latents, bool):
        latents = [latents]
    if isinstance(latents, Tensor):
        latents = latents.flatten().tolist()
    out = []
    for i in latents:
        if isinstance(i, bool) or not isinstance(i, int) or not -sae.d_sae <= i < sae.d_sae:
            raise IndexError(
                f"SAEPatch: {name} latent {i!r} out of range for d_sae={sae.d_sae} "
                f"(valid 0..{sae.d_sae - 1})"
            )
        out.append(i % sae.d_sae)
    return out


def _values(edits: Any, sae: SAE, name: str) -> dict[int, float]:
    if edits is None:
        return {}
    if not isinstance(edits, Mapping):
        raise ValueError(
            f"SAEPatch: {name} maps latents to numbers, e.g. {{12: 5.0}}; got {edits!r}"
        )
    idx = _indices(list(edits), sae, name)
    return {i: check_number(v, f"{name}[{i}]", "SAEPatch") for i, v in zip(idx, edits.values())}


class SAEPatch(Intervention):
    """Splice ``sae`` at its site, optionally editing latents (see the module docstring).

    Args:
        sae: an :class:`~oculi.sae.SAE` bound to a site and layer.
        error: add the SAE's error term back (the model is unchanged except for the edits).
        ablate: latent index or indices set to 0.
        clamp: ``{latent: value}`` set to a value.
        steer: ``{latent: c}`` added to the latent (``+c · W_dec[i]`` in the activation).
        positions: prompt positions (int, list, slice) or ``None`` for all.
        steps: ``"all"``, a range or a list of generation steps (0 = the prompt pass).
        record: keep each forward's latents in :attr:`recorded`.

    Raises:
        IndexError: a latent out of ``0..d_sae-1``; (on binding) a layer out of range.
        ValueError: a non-numeric clamp/steer value; (on binding) an SAE bound to no site, or
            whose widths do not fit the model's site.
    """

    def __init__(
        self,
        sae: SAE,
        *,
        error: bool = False,
        ablate: int | Iterable[int] | None = None,
        clamp: Mapping[int, float] | None = None,
        steer: Mapping[int, float] | None = None,
        positions: Position = None,
        steps: Steps = "all",
        record: bool = False,
    ) -> None:
        if not isinstance(sae, SAE):
            raise TypeError(f"SAEPatch takes an oculi.sae.SAE, got {type(sae).__name__}")
        self.sae, self.error, self.record = sae, bool(error), bool(record)
        self.ablate = _indices(ablate, sae, "ablate")
        self.clamp = _values(clamp, sae, "clamp")
        self.steer = _values(steer, sae, "steer")
        self.positions = check_position(positions, "SAEPatch")
        self.steps = steps
        self._steps = check_steps(steps)
        self.recorded: list[Tensor] = []

    def _repr_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"site": self.sae.site, "layer": self.sae.layer, "error": self.error}
        for name in ("ablate", "clamp", "steer"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.positions is not None:
            out["positions"] = self.positions
        return out

    @property
    def edited(self) -> list[int]:
        """The latents this patch changes, in order."""
        return sorted({*self.ablate, *self.clamp, *self.steer})

    def edit_latents(self, a: Tensor) -> Tensor:
        """``a [..., d_sae]`` with the ablations, clamps and steering applied (a new tensor)."""
        a = a.clone()
        if self.ablate:
            a[..., self.ablate] = 0
        for i, v in self.clamp.items():
            a[..., i] = v
        for i, c in self.steer.items():
            a[..., i] = a[..., i] + c
        return a

    def new_activation(self, x_read: Tensor, x_write: Tensor) -> Tensor:
        """What the written site becomes, from the read and written activations ``[..., ·]``."""
        sae = self.sae
        a = sae.encode(x_read)
        if self.record:
            self.recorded.append(a.detach().clone())
        if self.error:
            idx = self.edited
            if not idx:
                return x_write
            delta = (self.edit_latents(a) - a)[..., idx] @ sae.W_dec[idx]
            return x_write + delta.to(x_write.device, x_write.dtype)
        return sae.decode(self.edit_latents(a), x_read).to(x_write.device, x_write.dtype)

    def bind(self, adapter: Adapter) -> Binding:
        what = repr(self)
        layer, read_site, write_site = self.sae.check_model(adapter, what)
        if self.error and not self.edited and not self.record:
            return Binding(edits=[], noop="error=True without latent edits leaves the model as is")
        write = _SpliceWrite(adapter, write_site, layer, self, read_site != write_site)
        edits = [write.edit()]
        if read_site != write_site:
            edits.insert(0, Edit(kind=read_site, layer=layer, apply=write.keep_input, owner=self))
        return Binding(edits=edits, begins=[write.begin])


class _SpliceWrite(SiteWrite):
    """The write: the selected columns of the site replaced by :meth:`SAEPatch.new_activation`."""

    def __init__(self, adapter: Adapter, site: str, layer: int, patch: SAEPatch, split: bool):
        steps: frozenset[int] | Literal["all"] = "all" if patch._steps is None else patch._steps
        super().__init__(
            adapter, site, layer, 0.0, position=patch.positions, steps=steps, owner=patch
        )
        self.patch, self.split = patch, split
        self._input: Tensor | None = None

    def keep_input(self, x: Tensor, span: Span) -> None:
        """The transcoder's read: remember this forward's input (changes nothing)."""
        self._input = x

    def apply(self, x: Tensor, span: Span) -> None:
        _rows, local, _ = self.selection(span)  # no rows=: every row
        if local is None:
            return
        index: Any = local if not isinstance(local, list) else torch.tensor(local, device=x.device)
        source = x
        if self.split:
            if self._input is None or self._input.shape[:-1] != x.shape[:-1]:
                raise RuntimeError(f"{self.what}: the transcoder's input site did not run first")
            source, self._input = self._input, None
        if isinstance(index, slice):
            x[..., index, :] = self.patch.new_activation(source[..., index, :], x[..., index, :])
        else:
            sel_in, sel_out = source.index_select(-2, index), x.index_select(-2, index)
            x.index_copy_(-2, index, self.patch.new_activation(sel_in, sel_out))
