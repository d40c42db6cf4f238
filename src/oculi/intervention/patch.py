"""Activation patching: overwrite (or add to) a site's activation at chosen positions.

::

    clean = adapter.capture_residual(clean_ids).post_mlp          # [L, T, d_model]
    patch = ActivationPatch("resid_post", layer=4, position=-1, value=clean[4, -1])
    with InterventionContext(adapter, [patch]):
        logits = adapter.forward(corrupt_ids)                     # corrupt run, clean state at -1

The value is in the site's capture layout and must *broadcast* to the selected slice, which
is, with ``B`` rows, ``P`` positions and ``W`` the site's width:

- ``[B, P, W]`` for residual/MLP sites, ``[B, H, P, D]`` for per-head sites (``H_kv`` heads for
  ``k``/``v``/``k_pre``); ``head=h`` drops the head axis, an int ``position`` the position axis.

So a ``[W]`` vector works everywhere, a ``[B, ...]`` value gives each row its own patch (as
patching sweeps need), and ``rows=`` restricts a patch to some rows of the batch.

Positions are columns of the prompt (negatives count from its end), padding included as in
the ``[B, T]`` ids, and never a padding column of a patched row. ``position=None`` means every
column: with a value that has no per-position axis this includes tokens generated later; a
value with one (``P = prompt length``) covers the prompt only. During generation an int or
list position is a prompt position, patched in the prompt pass (and, without the KV cache,
again in every step, which gives the same result).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from oculi.capture.sites import MODULE_KINDS, SITE_KINDS, check_kind
from oculi.intervention.base import Binding, Intervention, check_placement, check_tensor
from oculi.intervention.module_paths import site_of_module
from oculi.intervention.state import (
    Position,
    Session,
    check_position,
    resolve_positions,
    resolve_rows,
    uniform_shift,
)
from oculi.intervention.writers import Edit, Span, check_writable

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

Mode = Literal["replace", "add", "mul"]
_WIDTH_NAMES = {"d_model": "d_model", "d_head": "d_head", "d_mlp": "d_mlp", "pos": "key_positions"}


class SiteWrite:
    """The core every intervention builds on: one value written into one site of one layer.

    Args:
        adapter: the model.
        kind: a writable site kind.
        layer: a layer index (negatives count from the end).
        value: a tensor broadcastable to the selected slice (see the module docstring), or a
            number.
        mode: ``"replace"``, ``"add"``, or ``"mul"`` (multiply, e.g. Q scaling).
        head: one head of a per-head site, or ``None`` for all heads.
        position: prompt positions (see :mod:`oculi.intervention.state`), ``None``: all.
        rows: batch rows to write, ``None``: all.
        steps: ``None``: patch semantics (a ``position`` names prompt columns only; with
            ``position=None`` and no per-position value, generated columns too). ``"all"`` or
            a set of generation steps (0 = the prompt pass): ``position`` restricts the prompt
            pass, and each selected step ``k ≥ 1`` writes the column it feeds.
        owner: the intervention, for messages and effect checks.
    """

    def __init__(
        self,
        adapter: Adapter,
        kind: str,
        layer: int,
        value: torch.Tensor | float,
        *,
        mode: Mode = "replace",
        head: int | None = None,
        position: Position = None,
        rows: Sequence[int] | None = None,
        steps: frozenset[int] | Literal["all"] | None = None,
        owner: Any = None,
    ) -> None:
        self.what = repr(owner) if owner is not None else f"{kind} write"
        self.kind = check_writable(adapter, kind, self.what)
        self.spec = MODULE_KINDS[kind] if kind in MODULE_KINDS else SITE_KINDS[kind]
        self.layer = adapter.resolve_layer(layer)
        self.mode = mode
        self.owner = owner if owner is not None else self
        self.position = check_position(position, self.what)
        self.rows = list(rows) if rows is not None else None
        self.steps = steps
        n_heads = adapter.n_kv_heads if self.spec.kv else adapter.n_heads
        if head is not None:
            if not self.spec.per_head:
                raise ValueError(f"{self.what}: site {kind!r} has no heads; leave head=None")
            head = adapter.resolve_head(head, kind)
        self.head = head
        self.n_heads = n_heads
        self.width = {
            "d_model": adapter.d_model,
            "d_head": adapter.d_head,
            "d_mlp": adapter.d_mlp,
        }.get(self.spec.width)
        value = check_placement(
            check_tensor(value, "value", self.what), adapter, "value", self.what
        )
        self.value = self._canonical(value)
        # a per-position value covers prompt columns only
        self.per_position = self.value.shape[-2] > 1

    # -- shapes ---------------------------------------------------------------------------
    def _user_dims(
        self, batch: int | None = None, n_pos: int | None = None
    ) -> list[tuple[str, int | None]]:
        dims: list[tuple[str, int | None]] = [("batch", batch)]
        if self.spec.per_head and self.head is None:
            dims.append(("heads", self.n_heads))
        if not isinstance(self.position, int):
            dims.append(("positions", n_pos))
        dims.append((_WIDTH_NAMES[self.spec.width], self.width))
        return dims

    def _shape_error(self, value_shape: Sequence[int], dims, why: str = "") -> ValueError:
        expected = ", ".join(f"{n}={s}" if s is not None else n for n, s in dims)
        return ValueError(
            f"{self.what}: value has shape {list(value_shape)}, expected a tensor broadcastable "
            f"to the selected slice [{expected}] of site {self.kind!r}{why}"
        )

    def _canonical(self, value: torch.Tensor) -> torch.Tensor:
        """Value -> ``[b, p, w]`` or ``[b, h, p, w]`` with each axis 1 or full."""
        known = len(self.position) if isinstance(self.position, list) else None
        dims = self._user_dims(n_pos=known)
        rank = 4 if self.spec.per_head else 3
        if value.dim() == 0:
            return value.reshape([1] * rank)
        if value.dim() > len(dims):
            raise self._shape_error(value.shape, dims, f" (too many dimensions: {value.dim()})")
        shape = [1] * (len(dims) - value.dim()) + list(value.shape)
        for (name, size), got in zip(dims, shape):
            if name == "batch" or size is None:
                continue
            if got != size and not (name in ("heads", "positions") and got == 1):
                raise self._shape_error(value.shape, dims)
        value = value.reshape(shape)
        if isinstance(self.position, int):
            value = value.unsqueeze(-2)
        if self.spec.per_head and self.head is not None:
            value = value.unsqueeze(1)
        return value

    # -- per session ----------------------------------------------------------------------
    def begin(self, session: Session) -> None:
        """Resolve rows and positions for a new prompt and check the value against them."""
        rows = resolve_rows(self.rows, session.batch, self.what)
        cols = resolve_positions(self.position, session, rows, self.what)
        if self.per_position and cols is None:
            uniform_shift(session, rows, self.what, "a value per position")
        n_pos = len(cols) if cols is not None else session.prompt_len
        b, p = self.value.shape[0], self.value.shape[-2]
        if b not in (1, len(rows)) or p not in (1, n_pos):
            user = list(self.value.shape)
            if self.spec.per_head and self.head is not None:
                user.pop(1)
            if isinstance(self.position, int):
                user.pop(-2)
            raise self._shape_error(user, self._user_dims(len(rows), n_pos))
        row_index = None if len(rows) == session.batch else torch.tensor(rows)
        session.store[self] = (row_index, cols)

    def _columns(self, span: Span, cols: list[int] | None) -> tuple[Any, torch.Tensor | None]:
        """Local indices along the position axis to write, and the value's indices for them."""
        start, end = span.start, span.start + span.length
        n = span.frame.session.prompt_len
        if cols is None and not self.per_position and self.steps in (None, "all"):
            return slice(0, span.length), None  # every column (the common case)
        local: list[int] = []
        vidx: list[int] = []
        steps = None if self.steps is None or self.steps == "all" else self.steps
        if steps is None or 0 in steps:
            if cols is None:
                lo, hi = max(start, 0), min(end, n)
                local.extend(range(lo - start, hi - start))
                vidx.extend(range(lo, hi))
            else:
                for i, c in enumerate(cols):
                    if start <= c < end:
                        local.append(c - start)
                        vidx.append(i)
        lo = max(start, n)
        if self.per_position or lo >= end:
            pass
        elif self.steps == "all" or (self.steps is None and cols is None):
            local.extend(range(lo - start, end - start))
        elif steps is not None:
            for k in sorted(steps):
                c = n + k - 1
                if k > 0 and lo <= c < end:
                    local.append(c - start)
        if not local:
            return None, None
        index: Any = local
        if local == list(range(local[0], local[-1] + 1)):
            index = slice(local[0], local[-1] + 1)
        v = torch.tensor(vidx) if self.per_position else None
        return index, v

    # -- forward --------------------------------------------------------------------------
    def selection(self, span: Span) -> tuple[Any, Any, torch.Tensor | None]:
        """``(row index, local columns, value indices)`` this forward writes (see
        :meth:`_columns`); the columns are ``None`` when it writes nothing."""
        store = span.frame.session.store
        if self not in store:
            self.begin(span.frame.session)
        row_index, cols = store[self]
        local, vidx = self._columns(span, cols)
        return row_index, local, vidx

    def apply(self, x: torch.Tensor, span: Span) -> None:
        row_index, local, vidx = self.selection(span)
        if local is None:
            return
        value = self._value(x, span)
        if value.device != x.device:  # a layer on another device of a sharded model
            value = value.to(x.device)
        if value.shape[-1] not in (1, x.shape[-1]):
            raise self._shape_error(value.shape, self._user_dims(x.shape[0], None))
        if vidx is not None:
            value = value.index_select(-2, vidx.to(value.device))
        per_head = self.spec.per_head
        if row_index is None and not isinstance(local, list):
            # basic indexing: a view of x
            if per_head and self.head is not None:
                target = x[:, self.head, local]
                value = value[:, 0]
            else:
                target = x[..., local, :]
            _write(target, value, self.mode)
            return
        rows = row_index if row_index is not None else torch.arange(x.shape[0])
        loc = (
            torch.arange(x.shape[-2])[local] if not isinstance(local, list) else torch.tensor(local)
        )
        rows, loc = rows.to(x.device), loc.to(x.device)
        idx: tuple[torch.Tensor, ...]
        if per_head:
            heads = torch.arange(x.shape[1]) if self.head is None else torch.tensor([self.head])
            idx = (rows[:, None, None], heads.to(x.device)[None, :, None], loc[None, None, :])
        else:
            idx = (rows[:, None], loc[None, :])
        if self.mode == "replace":
            x[idx] = value
        elif self.mode == "add":
            x[idx] = x[idx] + value
        else:
            x[idx] = x[idx] * value

    def _value(self, x: torch.Tensor, span: Span) -> torch.Tensor:
        """The canonical value for this forward (subclasses derive it from the input)."""
        return self.value

    def edit(self) -> Edit:
        return Edit(kind=self.kind, layer=self.layer, apply=self.apply, owner=self.owner)


def _write(target: torch.Tensor, value: torch.Tensor, mode: str) -> None:
    if mode == "replace":
        target.copy_(value.expand_as(target))
    elif mode == "add":
        target.add_(value)
    else:
        target.mul_(value)


class ActivationPatch(Intervention):
    """Replace (or add to) the activation of ``site`` at ``layer`` and ``position``.

    Example::

        ActivationPatch("z", layer=3, position=[4, 5], value=clean_z[:, 3, 1, 4:6], head=1)
        ActivationPatch(layer_name="model.layers.3.mlp", position=-1, value=v)  # seed 002's form

    Args:
        site: any site kind except ``head_out`` (see :mod:`oculi.capture.sites`).
        layer: layer index (negatives count from the end).
        layer_name: instead of ``site`` and ``layer``, the Hugging Face path of the module
            whose output to patch (``"model.layers.3"``, ``"model.layers.3.mlp"``, its norms
            and attention), mapped through the model's anatomy when bound
            (:mod:`oculi.intervention.module_paths`; an unknown path is an
            ``UnknownSiteError`` listing the valid ones).
        position: an int, a list, a slice, or ``None`` for every column.
        value: a tensor broadcastable to the selected slice (module docstring), on the model's
            dtype and device, or a number.
        mode: ``"replace"`` or ``"add"``.
        head: one head of a per-head site (``q``, ``k``, ``v``, ``q_pre``, ``k_pre``,
            ``pattern``, ``z``), or ``None`` for all.
        rows: batch rows to patch (``None``: all), for patches that differ per row.

    Raises:
        UnknownSiteError: an unknown site name (on construction).
        ValueError: a bad mode, position type or value (on construction); a value of the wrong
            shape, dtype or device, or a head out of range (on binding, before any forward);
            a position that is padding (when the prompt arrives, before any layer runs).
        IndexError: a layer out of range (on binding) or a position past the prompt.
    """

    def __init__(
        self,
        site: str | None = None,
        layer: int | None = None,
        position: Position = None,
        value: torch.Tensor | float | None = None,
        mode: Literal["replace", "add"] = "replace",
        head: int | None = None,
        *,
        rows: Sequence[int] | None = None,
        layer_name: str | None = None,
    ) -> None:
        if layer_name is not None:
            what = f"ActivationPatch(layer_name={layer_name!r})"
            if site is not None or layer is not None:
                raise ValueError(
                    f"{what}: give either layer_name= (a module path) or site= and layer=, "
                    f"not both (got site={site!r}, layer={layer!r})"
                )
            if not isinstance(layer_name, str):
                raise TypeError(f"{what}: layer_name must be a module path string")
        else:
            what = f"ActivationPatch(site={site!r}, layer={layer})"
            if site is None or layer is None:
                raise ValueError(
                    f"{what}: say where to patch: site= and layer= (e.g. site='resid_post', "
                    "layer=3) or layer_name= (a module path, e.g. 'model.layers.3.mlp')"
                )
            check_kind(site)
        if mode not in ("replace", "add"):
            raise ValueError(f"ActivationPatch: mode must be 'replace' or 'add', got {mode!r}")
        if value is None:
            raise ValueError(f"{what}: value is required (a tensor or a number)")
        self.site, self.layer, self.mode, self.head = site, layer, mode, head
        self.layer_name = layer_name
        self.position = check_position(position, what)
        self.value = check_tensor(value, "value", what)
        self.rows = rows

    def _repr_fields(self) -> dict[str, Any]:
        where: dict[str, Any] = (
            {"layer_name": self.layer_name}
            if self.layer_name is not None
            else {"site": self.site, "layer": self.layer}
        )
        out = {**where, "position": self.position, "mode": self.mode}
        if self.head is not None:
            out["head"] = self.head
        return out

    def bind(self, adapter: Adapter) -> Binding:
        if self.layer_name is not None:
            site, layer = site_of_module(adapter, self.layer_name)
        else:
            site, layer = cast(str, self.site), cast(int, self.layer)
        w = SiteWrite(
            adapter,
            site,
            layer,
            self.value,
            mode=self.mode,
            head=self.head,
            position=self.position,
            rows=self.rows,
            owner=self,
        )
        return Binding(edits=[w.edit()], begins=[w.begin])
