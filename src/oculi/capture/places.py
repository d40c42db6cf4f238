"""Where each site kind lives in a decoder layer: one locator per kind, read by everything.

::

    loc = locate("q_pre", adapter)   # Location(read=Place("self_attn.q_norm", "output", view))
    loc.read.module, loc.read.at     # which module, and whether at its input or its output

A :class:`Place` names a module inside the layer (``None``: the layer itself) and whether the
site is that module's input or its output, with a *view* from the module's tensor to the
site's capture layout (``[B, T, W]``, or ``[B, H, T, D]`` for per-head kinds), or an attention
bridge tap (:mod:`oculi.capture.bridge`) instead of a module hook. Views are views: writing
into one writes into the module's tensor. Capture (``engine``), interventions
(``intervention/writers``), patching (``patching/writers``) and gradients
(``patching/attribution``) all hook the place :func:`locate` gives, so a new site is one
entry in :data:`LOCATORS`, and the family differences live here and in the anatomy only:

- fused QKV (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``: ``[q | k | v]``; GPT-NeoX: per head
  ``[(q k v), d]``) gives ``q_pre``/``k_pre`` as slices of one output; q/k norms (Qwen 3,
  Gemma 3, OLMo 2) give them as the norm outputs in the norm's layout;
- norms after the attention or MLP branch (Gemma 2/3, OLMo 2) move ``attn_out``/``mlp_out``
  to the norm's output; ``mlp_result`` stays the MLP's own output;
- no pre-attention norm (OLMo 2): ``attn_in`` is read at the layer input and written at the
  attention module's input (the same tensor, but a write there leaves ``resid_pre`` alone);
- parallel attention (GPT-NeoX ``use_parallel_residual``): no module sees ``resid_mid``, so
  it is derived (``resid_pre + attn_out``) when read;
- ``resid_mid`` is written through the attention branch's output (``plus_input``), so both
  the MLP input and the residual carried past it see the change;
- a fused ``[gate | up]`` projection (Phi-3) gives ``mlp_gate``/``mlp_up`` as its halves; a
  plain MLP (GPT-2, NeoX) has no ``mlp_gate`` at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn

from oculi.capture.bridge import LayerTaps
from oculi.capture.hooks import HookSet, first_tensor, hidden_arg, replace_first

if TYPE_CHECKING:
    from oculi.models.anatomy import Anatomy

View = Callable[[torch.Tensor], torch.Tensor]


class ModelParts(Protocol):
    """What the capture engine and the locators read of a model (an :class:`~oculi.Adapter`)."""

    model: nn.Module
    anatomy: Anatomy
    decoder: nn.Module
    layer_modules: list[nn.Module]
    attention_configs: list[Any]
    attention_layer_ids: dict[int, int]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def part(self, layer: int, path: str) -> nn.Module: ...

    def module(self, path: str) -> nn.Module: ...

    def resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]: ...

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]: ...


@dataclass(frozen=True)
class Place:
    """Where a site's tensor passes through one layer.

    Attributes:
        module: path inside the layer (``"self_attn.o_proj"``); ``None`` is the layer itself.
        at: ``"input"`` (the hidden-states argument) or ``"output"`` (the main output).
        view: module tensor -> the site in capture layout (a view: writes go through).
        tap: a :class:`~oculi.capture.bridge.LayerTaps` field instead of a module hook.
        cached: a tap whose position axis also holds cached (or recorded prefix) columns,
            ending at the newest one (keys and values).
        plus_input: the site is the layer's input plus this output (``resid_mid`` written
            through the attention branch).
    """

    module: str | None = None
    at: Literal["input", "output"] = "output"
    view: View | None = None
    tap: str | None = None
    cached: bool = False
    plus_input: bool = False


@dataclass(frozen=True)
class Location:
    """Where one site kind is read and written in a model.

    Attributes:
        read: the place a capture reads (``None``: derived from the ``derived`` kinds, see
            :func:`oculi.capture.engine.expand_requests`, or ``absent``).
        write: the place interventions, patching and gradients use (``None``: see
            ``readonly`` or ``absent``).
        derived: the kinds a capture records to compute this one when ``read`` is ``None``.
        absent: why this model has no such site at all (``mlp_gate`` of a plain MLP).
        readonly: why the site exists but cannot be written (``head_out``).
    """

    read: Place | None
    write: Place | None
    derived: tuple[str, ...] = ()
    absent: str = ""
    readonly: str = ""

    @staticmethod
    def at(place: Place) -> Location:
        """Read and written at the same place."""
        return Location(place, place)


def heads_view(n_heads: int, layout: str) -> View:
    """``[B, T, H*D]`` (``"flat"``), ``[B, T, H, D]`` (``"bthd"``) or ``"bhtd"`` -> ``[B, H, T, D]``."""

    def view(x: torch.Tensor) -> torch.Tensor:
        if layout == "bhtd":
            return x
        if layout == "flat":
            x = x.view(*x.shape[:2], n_heads, -1)
        return x.transpose(1, 2)

    return view


def fused_qkv_view(m: ModelParts, which: int) -> View:
    """The q (``which=0``), k (1) or v (2) part of a fused projection's output, ``[B, H, T, D]``."""
    h, h_kv, d = m.n_heads, m.n_kv_heads, m.d_head
    per_head = m.anatomy.qkv_layout == "per_head"

    def view(out: torch.Tensor) -> torch.Tensor:
        b, t = out.shape[:2]
        if per_head:  # GPT-NeoX: [head, (q k v), d]
            return out.view(b, t, h, 3 * d)[..., which * d : (which + 1) * d].transpose(1, 2)
        lo = (0, h * d, (h + h_kv) * d)[which]
        n = h if which == 0 else h_kv
        return out[..., lo : lo + n * d].view(b, t, n, d).transpose(1, 2)

    return view


def half_view(which: int) -> View:
    """The first (0) or second (1) half of the last axis (Phi-3's ``[gate | up]``)."""

    def view(out: torch.Tensor) -> torch.Tensor:
        n = out.shape[-1] // 2
        return out[..., which * n : (which + 1) * n]

    return view


def _z_view(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)  # the bridge hands z as [B, T, H, D]


def _attn(anat: Anatomy, name: str) -> str:
    return f"{anat.attn}.{name}"


def _mlp(anat: Anatomy, name: str) -> str:
    return f"{anat.mlp}.{name}"


def _qk_pre(which: int) -> Callable[[ModelParts], Location]:
    def locate(m: ModelParts) -> Location:
        anat = m.anatomy
        if anat.qkv_proj is not None:
            fused = _attn(anat, anat.qkv_proj)
            return Location.at(Place(fused, "output", fused_qkv_view(m, which)))
        norm = anat.q_norm if which == 0 else anat.k_norm
        proj = anat.q_proj if which == 0 else anat.k_proj
        n = m.n_heads if which == 0 else m.n_kv_heads
        layout = anat.qk_norm_layout if norm else "flat"
        # one of norm/proj is set: Anatomy checks that separate projections are named
        return Location.at(Place(_attn(anat, norm or proj or ""), "output", heads_view(n, layout)))

    return locate


def _attn_in(m: ModelParts) -> Location:
    anat = m.anatomy
    if anat.attn_norm is not None:
        return Location.at(Place(anat.attn_norm, "output"))
    # no pre-attention norm (OLMo 2): the layer input, written where only attention reads it
    return Location(Place(None, "input"), Place(anat.attn, "input"))


def _attn_branch(anat: Anatomy) -> str:
    """The module whose output is what attention adds to the residual."""
    return anat.attn_out_norm or anat.attn


def _resid_mid(m: ModelParts) -> Location:
    anat = m.anatomy
    write = Place(_attn_branch(anat), "output", plus_input=True)
    if anat.is_parallel(m.model.config):
        return Location(None, write, derived=("resid_pre", "attn_out"))
    return Location(Place(anat.mlp_norm or anat.mlp, "input"), write)


def _mlp_proj(which: int) -> Callable[[ModelParts], Location]:
    def locate(m: ModelParts) -> Location:
        anat = m.anatomy
        if anat.gate_up_proj is not None:  # Phi-3: [gate | up]
            return Location.at(Place(_mlp(anat, anat.gate_up_proj), "output", half_view(which)))
        name = anat.gate_proj if which == 0 else anat.up_proj
        if name is None:
            kind = ("mlp_gate", "mlp_up")[which]
            return Location(
                None,
                None,
                absent=f"site {kind!r} does not exist in the {anat.family!r} family's plain "
                "(ungated) MLP; its input projection is 'mlp_up'",
            )
        return Location.at(Place(_mlp(anat, name), "output"))

    return locate


def _tap(kind: str, view: View | None = None, cached: bool = False):
    place = Place(tap=kind, view=view, cached=cached)
    return lambda m: Location.at(place)


def _module(at: Literal["input", "output"], path: Callable[[Anatomy], str | None]):
    return lambda m: Location.at(Place(path(m.anatomy), at))


_HEAD_OUT_READONLY = (
    "site 'head_out' (a head's contribution to the residual) is derived from z and cannot be "
    "written directly; patch 'z' with head=<h> (the head's output before the output "
    "projection), or 'attn_out'"
)


def _head_out(m: ModelParts) -> Location:
    # z as the output projection sees it, and (behind an output norm) its output for the gain
    derived = ("o_in", "o_out") if m.anatomy.attn_out_norm else ("o_in",)
    return Location(None, None, derived=derived, readonly=_HEAD_OUT_READONLY)


#: site kind -> its locator (``SITE_KINDS`` order), plus the internal kinds the engine records
#: for derived sites: ``mlp_result`` (the MLP's own output), ``resid_final`` (the last layer's
#: output in the model's dtype) and the output projection's input and output
#: ``o_in``/``o_out`` (for ``head_out``).
LOCATORS: dict[str, Callable[[ModelParts], Location]] = {
    "resid_pre": _module("input", lambda a: None),
    "attn_in": _attn_in,
    "q_pre": _qk_pre(0),
    "k_pre": _qk_pre(1),
    "q": _tap("q"),
    "k": _tap("k", cached=True),
    "v": _tap("v", cached=True),
    "pattern": _tap("pattern"),
    "z": _tap("z", _z_view),
    "head_out": _head_out,
    "attn_out": _module("output", _attn_branch),
    "resid_mid": _resid_mid,
    "mlp_in": _module("input", lambda a: a.mlp),
    "mlp_gate": _mlp_proj(0),
    "mlp_up": _mlp_proj(1),
    "mlp_post": _module("input", lambda a: _mlp(a, a.down_proj)),
    "mlp_out": _module("output", lambda a: a.mlp_out_norm or a.mlp),
    "resid_post": _module("output", lambda a: None),
    "mlp_result": _module("output", lambda a: a.mlp),
    "resid_final": _module("output", lambda a: None),
    "o_in": _module("input", lambda a: _attn(a, a.o_proj)),
    "o_out": _module("output", lambda a: _attn(a, a.o_proj)),
}


def locate(kind: str, m: ModelParts) -> Location:
    """Where ``kind`` is read and written in ``m``'s layers (``KeyError`` for unknown kinds)."""
    return LOCATORS[kind](m)


def module_at(m: ModelParts, layer: int, place: Place) -> nn.Module:
    """The module a (non-tap) place hooks in ``layer``."""
    block = m.layer_modules[layer]
    return block if place.module is None else m.part(layer, place.module)


def add_reader(
    hooks: HookSet,
    taps: dict[int, LayerTaps],
    m: ModelParts,
    layer: int,
    place: Place,
    fn: Callable[[torch.Tensor], None],
) -> None:
    """Call ``fn(site)`` (capture layout) each time the forward passes ``place`` of ``layer``.

    Module hooks go into ``hooks``; bridge taps into ``taps``, which the caller activates with
    :func:`oculi.capture.bridge.attention_bridge` when it is not empty.
    """
    view = place.view
    if place.tap is not None:

        def tap(x: torch.Tensor) -> None:
            fn(view(x) if view else x)

        getattr(taps.setdefault(layer, LayerTaps()), place.tap).append(tap)
        return
    module = module_at(m, layer, place)
    if place.at == "output":

        def out_hook(_m: nn.Module, _args: Any, output: Any) -> None:
            x = first_tensor(output)
            fn(view(x) if view else x)

        hooks.forward(module, out_hook)
    else:

        def in_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            x = hidden_arg(args, kwargs)
            fn(view(x) if view else x)

        hooks.forward_pre_kwargs(module, in_hook)


def add_replacer(
    hooks: HookSet,
    taps: dict[int, LayerTaps],
    m: ModelParts,
    layer: int,
    place: Place,
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """Replace the tensor at ``place`` of ``layer`` by ``fn(tensor)`` in every forward.

    ``fn`` gets the module's tensor (not the site view; apply ``place.view`` to a copy to edit
    the site in capture layout) and returns the tensor to use instead. For a ``plus_input``
    place it gets the layer input plus the module output, and the change it makes is added to
    the output. Taps go into ``taps`` as in :func:`add_reader`.
    """
    if place.tap is not None:
        lt = taps.setdefault(layer, LayerTaps())
        getattr(lt, place.tap).append(fn)
        if place.tap == "pattern":  # a replaced pattern needs the eager path that uses it
            lt.pattern_edits = True
        return
    module = module_at(m, layer, place)
    if place.plus_input:
        _add_plus_input(hooks, m.layer_modules[layer], module, fn)
    elif place.at == "output":
        hooks.forward(module, lambda _m, _a, out: replace_first(out, fn(first_tensor(out))))
    else:

        def in_hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            new = fn(hidden_arg(args, kwargs))
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        hooks.forward_pre_kwargs(module, in_hook)


def _add_plus_input(
    hooks: HookSet,
    block: nn.Module,
    module: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """``site = block input + module output``: replace that sum, add the change to the output."""
    stash: list[torch.Tensor] = []

    def keep(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        stash[:] = [hidden_arg(args, kwargs)]

    def write(_m: nn.Module, _args: Any, output: Any) -> Any:
        out = first_tensor(output)
        site = stash.pop() + out
        return replace_first(output, out + (fn(site) - site))

    # registered after any writer of the block input, so it keeps the edited input
    hooks.forward_pre_kwargs(block, keep)
    hooks.forward(module, write)
