"""Writers: the hooks that change a site, one place per site kind.

The capture engine (:mod:`oculi.capture.engine`) *reads* each site kind from one module hook or
attention-bridge tap; this module *writes* the same places, so a capture taken inside an
intervention context records exactly what the intervened model computed. Every intervention
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
from torch import nn

from oculi.capture.bridge import LayerTaps
from oculi.capture.hooks import HookSet, first_tensor, replace_first
from oculi.capture.sites import SITE_KINDS, check_kind
from oculi.intervention.state import Frame, Tracker

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

BRIDGE_KINDS = frozenset({"q", "k", "v", "pattern", "z"})
KV_KINDS = frozenset({"k", "v"})
WRITABLE = tuple(k for k in SITE_KINDS if k != "head_out")


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
    check_kind(kind)
    if kind == "head_out":
        raise ValueError(
            f"{what}: site 'head_out' (a head's contribution to the residual) is derived from "
            "z and cannot be written directly; patch 'z' with head=<h> (the head's output "
            "before the output projection), or 'attn_out'"
        )
    if kind == "mlp_gate" and not adapter.anatomy.gated:
        raise ValueError(
            f"{what}: site 'mlp_gate' does not exist in the {adapter.anatomy.family!r} family's "
            "plain (ungated) MLP; its input projection is 'mlp_up'"
        )
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

    ``hooks`` must be an active :class:`HookSet`; bridge taps go into ``taps``, which the caller
    activates with :func:`oculi.capture.bridge.attention_bridge` when it is non-empty.
    """
    grouped: dict[tuple[int, str], list[Edit]] = {}
    for e in edits:
        grouped.setdefault((e.layer, e.kind), []).append(e)
    order = {k: i for i, k in enumerate(SITE_KINDS)}
    for layer, kind in sorted(grouped, key=lambda lk: (lk[0], order[lk[1]])):
        run = _Runner(grouped[(layer, kind)], tracker, report)
        if kind in BRIDGE_KINDS:
            _install_tap(taps.setdefault(layer, LayerTaps()), kind, run)
        else:
            _install_module(adapter, hooks, layer, kind, run)


def _install_tap(lt: LayerTaps, kind: str, run: _Runner) -> None:
    def tap(x: torch.Tensor) -> torch.Tensor:
        if kind == "z":  # the bridge hands z as [B, T, H, D]
            out = x.clone()
            run(out.transpose(1, 2))
            return out
        out = x.clone()
        if kind in KV_KINDS:
            run(out, _kv_start(run.tracker.current(), int(out.shape[-2])))
        else:
            run(out)
        return out

    getattr(lt, kind).append(tap)
    if kind == "pattern":
        lt.pattern_edits = True


# -- module hooks ---------------------------------------------------------------------------
def _edit_output(run: _Runner, view: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """A forward hook replacing the module's main output by an edited copy."""

    def hook(_m: nn.Module, _args: Any, output: Any) -> Any:
        out = first_tensor(output).clone()
        run(view(out) if view else out)
        return replace_first(output, out)

    return hook


def _edit_input(run: _Runner):
    """A forward pre-hook (with kwargs) replacing the hidden-states argument by an edited copy."""

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            x = args[0].clone()
            run(x)
            return (x, *args[1:]), kwargs
        x = kwargs["hidden_states"].clone()
        run(x)
        return args, {**kwargs, "hidden_states": x}

    return hook


def _heads_view(n_heads: int, layout: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A view ``[B, H, T, D]`` of a q/k projection or norm output (writes go through)."""

    def view(x: torch.Tensor) -> torch.Tensor:
        if layout == "bhtd":
            return x
        if layout == "flat":
            x = x.view(*x.shape[:2], n_heads, -1)
        return x.transpose(1, 2)

    return view


def _fused_qkv_view(adapter: Adapter, which: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A view ``[B, H, T, D]`` of the q (``which=0``) or k (``1``) part of a fused projection."""
    h, h_kv, d = adapter.n_heads, adapter.n_kv_heads, adapter.d_head

    def view(out: torch.Tensor) -> torch.Tensor:
        b, t = out.shape[:2]
        if adapter.anatomy.qkv_layout == "per_head":  # GPT-NeoX: [head, (q k v), d]
            return out.view(b, t, h, 3 * d)[..., which * d : (which + 1) * d].transpose(1, 2)
        lo = 0 if which == 0 else h * d
        n = h if which == 0 else h_kv
        return out[..., lo : lo + n * d].view(b, t, n, d).transpose(1, 2)

    return view


def _install_module(adapter: Adapter, hooks: HookSet, layer: int, kind: str, run: _Runner) -> None:
    anat = adapter.anatomy
    block = adapter.layer_modules[layer]
    attn = adapter.part(layer, anat.attn)
    mlp = adapter.part(layer, anat.mlp)

    def part(path: str) -> nn.Module:
        return adapter.part(layer, path)

    if kind == "resid_pre":
        hooks.forward_pre_kwargs(block, _edit_input(run))
    elif kind == "attn_in":
        if anat.attn_norm is not None:
            hooks.forward(part(anat.attn_norm), _edit_output(run))
        else:
            hooks.forward_pre_kwargs(attn, _edit_input(run))
    elif kind in ("q_pre", "k_pre"):
        _install_qk_pre(adapter, hooks, layer, kind, run)
    elif kind == "attn_out":
        hooks.forward(part(anat.attn_out_norm) if anat.attn_out_norm else attn, _edit_output(run))
    elif kind == "resid_mid":
        _install_resid_mid(adapter, hooks, layer, run)
    elif kind == "mlp_in":
        hooks.forward_pre_kwargs(mlp, _edit_input(run))
    elif kind in ("mlp_gate", "mlp_up"):
        if anat.gate_up_proj is not None:  # Phi-3: [gate | up]
            half = 0 if kind == "mlp_gate" else 1

            def view(out: torch.Tensor, half=half) -> torch.Tensor:
                n = out.shape[-1] // 2
                return out[..., half * n : (half + 1) * n]

            hooks.forward(part(f"{anat.mlp}.{anat.gate_up_proj}"), _edit_output(run, view))
        else:
            proj = anat.gate_proj if kind == "mlp_gate" else anat.up_proj
            hooks.forward(part(f"{anat.mlp}.{proj}"), _edit_output(run))
    elif kind == "mlp_post":
        hooks.forward_pre_kwargs(part(f"{anat.mlp}.{anat.down_proj}"), _edit_input(run))
    elif kind == "mlp_out":
        hooks.forward(part(anat.mlp_out_norm) if anat.mlp_out_norm else mlp, _edit_output(run))
    elif kind == "resid_post":
        hooks.forward(block, _edit_output(run))
    else:  # pragma: no cover - check_writable refuses the rest
        raise ValueError(f"site {kind!r} cannot be written")


def _install_qk_pre(adapter: Adapter, hooks: HookSet, layer: int, kind: str, run: _Runner) -> None:
    anat = adapter.anatomy
    if anat.qkv_proj is not None:
        fused = adapter.part(layer, f"{anat.attn}.{anat.qkv_proj}")
        which = 0 if kind == "q_pre" else 1
        hooks.forward(fused, _edit_output(run, _fused_qkv_view(adapter, which)))
        return
    norm = anat.q_norm if kind == "q_pre" else anat.k_norm
    proj = anat.q_proj if kind == "q_pre" else anat.k_proj
    n = adapter.n_heads if kind == "q_pre" else adapter.n_kv_heads
    layout = anat.qk_norm_layout if norm else "flat"
    src = adapter.part(layer, f"{anat.attn}.{norm or proj}")
    hooks.forward(src, _edit_output(run, _heads_view(n, layout)))


def _install_resid_mid(adapter: Adapter, hooks: HookSet, layer: int, run: _Runner) -> None:
    """``resid_mid = resid_pre + attn_out``: edit that sum, add the change to ``attn_out``."""
    anat = adapter.anatomy
    key = ("resid_pre", layer)

    def stash(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        run.tracker.current().scratch[key] = x

    def write(_m: nn.Module, _args: Any, output: Any) -> Any:
        out = first_tensor(output)
        resid = run.tracker.current().scratch.pop(key)
        mid = resid + out
        edited = mid.clone()
        run(edited)
        return replace_first(output, out + (edited - mid))

    # Registered after any resid_pre writer of this block, so it stashes the edited residual.
    hooks.forward_pre_kwargs(adapter.layer_modules[layer], stash)
    src = (
        adapter.part(layer, anat.attn_out_norm)
        if anat.attn_out_norm
        else adapter.part(layer, anat.attn)
    )
    hooks.forward(src, write)
