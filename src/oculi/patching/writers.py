"""Per-row writers: hooks that overwrite one site in chosen rows of a batched forward.

A sweep runs many patched copies of one prompt as a batch; row ``r`` carries its own patch
(a position, a head, or the whole site). :func:`patchers_for` returns, for the patched layer,
a function that registers the hooks (module hooks, or attention-bridge taps for q/k/v/pattern/z)
doing exactly those writes while that layer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet, first_tensor, replace_first

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


def _write_tokens(
    x: torch.Tensor, clean: torch.Tensor, specs: list[PatchSpec], offset: int = 0
) -> torch.Tensor:
    """``x [B, T', ·]`` with rows' positions replaced from ``clean [T, ·]``."""
    x = x.clone()
    for s in specs:
        at, src = offset_index(s.position, offset)
        x[s.row, at] = clean[src].to(x.dtype)
    return x


def _write_heads(
    x: torch.Tensor, clean: torch.Tensor, specs: list[PatchSpec], offset: int = 0
) -> torch.Tensor:
    """``x [B, H, T', ·]`` with rows' (head, position) replaced from ``clean [H, T, ·]``."""
    x = x.clone()
    for s in specs:
        h = _sel(s.head)
        at, src = offset_index(s.position, offset)
        x[s.row, h, at] = clean[h, src].to(x.dtype)
    return x


def _write_z(
    x: torch.Tensor, clean: torch.Tensor, specs: list[PatchSpec], offset: int = 0
) -> torch.Tensor:
    """``z [B, T', H, D]`` from ``clean [H, T, D]``."""
    x = x.clone()
    for s in specs:
        h = _sel(s.head)
        at, src = offset_index(s.position, offset)
        x[s.row, at, h] = clean.transpose(0, 1)[src, h].to(x.dtype)
    return x


def _replace_hidden(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def patchers_for(
    adapter: Adapter,
    site: str,
    layer: int,
    clean: torch.Tensor,
    specs: list[PatchSpec],
    resid_in: torch.Tensor,
    offset: int = 0,
) -> dict[int, Callable[[HookSet, ExitStack], None]]:
    """Hooks writing ``clean`` into ``site`` of ``layer`` for each spec's row.

    Args:
        clean: the clean activation of the site at this layer, without the batch dim.
        resid_in: the layer's input residual ``[T, d]`` of the run being patched (for
            ``resid_mid``, patched through the attention output so that both the MLP input
            and the residual carried past the MLP change).
        offset: the forward runs positions ``offset..T-1`` only (see
            :meth:`~oculi.patching.resume.ResumableRun.run_from`'s ``start``); keys and
            values still span all ``T`` positions there, the recorded prefix first.
    """
    anat = adapter.anatomy

    def out_writer(write: Callable[[torch.Tensor], torch.Tensor]):
        return lambda _m, _a, out: replace_first(out, write(first_tensor(out)))

    def in_writer(write: Callable[[torch.Tensor], torch.Tensor]):
        def hook(_m, args, kwargs):
            return _replace_hidden(args, kwargs, write(_hidden(args, kwargs)))

        return hook

    tokens = lambda x: _write_tokens(x, clean, specs, offset)  # noqa: E731

    def register(hooks: HookSet, stack: ExitStack) -> None:
        part = lambda path: adapter.part(layer, path)  # noqa: E731
        if site == "attn_in":
            if anat.attn_norm is not None:
                hooks.forward(part(anat.attn_norm), out_writer(tokens))
            else:
                hooks.forward_pre_kwargs(part(anat.attn), in_writer(tokens))
        elif site in ("attn_out", "resid_mid"):
            target = clean if site == "attn_out" else clean - resid_in.to(clean.dtype)
            src = part(anat.attn_out_norm) if anat.attn_out_norm else part(anat.attn)
            hooks.forward(src, out_writer(lambda x: _write_tokens(x, target, specs, offset)))
        elif site == "mlp_in":
            hooks.forward_pre_kwargs(part(anat.mlp), in_writer(tokens))
        elif site == "mlp_out":
            src = part(anat.mlp_out_norm) if anat.mlp_out_norm else part(anat.mlp)
            hooks.forward(src, out_writer(tokens))
        elif site == "mlp_post":
            hooks.forward_pre_kwargs(part(f"{anat.mlp}.{anat.down_proj}"), in_writer(tokens))
        elif site in ("mlp_gate", "mlp_up"):
            _mlp_proj_writer(adapter, layer, site, hooks, tokens)
        elif site == "resid_post":
            hooks.forward(adapter.layer_modules[layer], out_writer(tokens))
        elif site in ("q", "k", "v", "pattern", "z"):
            taps = LayerTaps()
            if site == "z":
                taps.z.append(lambda x: _write_z(x, clean, specs, offset))
            else:
                # keys and values arrive with the recorded prefix already prepended
                at = 0 if site in ("k", "v") else offset
                getattr(taps, site).append(lambda x: _write_heads(x, clean, specs, at))
                taps.pattern_edits = site == "pattern"
            stack.enter_context(
                attention_bridge(
                    adapter.attention_configs, adapter.attention_layer_ids, {layer: taps}
                )
            )
        else:
            raise ValueError(f"site {site!r} has no writer")

    return {layer: register}


def _mlp_proj_writer(adapter, layer, site, hooks: HookSet, tokens) -> None:
    anat = adapter.anatomy
    if anat.gate_up_proj is not None:
        fused = adapter.part(layer, f"{anat.mlp}.{anat.gate_up_proj}")
        half = 0 if site == "mlp_gate" else 1

        def hook(_m, _a, out):
            x = first_tensor(out)
            parts = list(x.chunk(2, dim=-1))
            parts[half] = tokens(parts[half])
            return replace_first(out, torch.cat(parts, dim=-1))

        hooks.forward(fused, hook)
        return
    name = anat.gate_proj if site == "mlp_gate" else anat.up_proj
    if name is None:
        raise ValueError(f"this model's MLP has no {site} (a plain MLP has no gate)")
    proj = adapter.part(layer, f"{anat.mlp}.{name}")
    hooks.forward(proj, lambda _m, _a, out: replace_first(out, tokens(first_tensor(out))))
