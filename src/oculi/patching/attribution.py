"""Attribution patching: a whole patching sweep from one forward and one backward pass.

Patching site ``a`` from its corrupt value ``a*`` to its clean value ``a'`` changes the metric
by approximately ``(a' − a*) · ∂metric/∂a`` (a first-order Taylor expansion around the corrupt
run; Nanda, 2023; Syed et al., 2023). One backward pass gives the gradient at every layer and
position at once, so the approximation of a ``[n_layers, T]`` sweep costs about as much as one
training step. It is exact for sites the metric depends on linearly and a guide elsewhere
(large patches through attention or norms can be far off): confirm what it finds with
:func:`oculi.patching.activation_patching`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from oculi.capture.hooks import HookSet, first_tensor
from oculi.capture.inputs import Batch
from oculi.capture.sites import check_kind
from oculi.errors import InputError
from oculi.models.anatomy import get_path
from oculi.patching._common import (
    check_aligned,
    check_read_position,
    prompt_tokens,
    single_prompt,
    with_reference,
)
from oculi.patching.activation import PatchingResult
from oculi.patching.metrics import Metric
from oculi.patching.resume import unembed

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

# sites whose gradient we take from a module output (forward hook) or input (pre-hook)
_OUTPUT_SITES = ("attn_out", "mlp_out", "resid_post")
_INPUT_SITES = ("resid_pre", "mlp_in", "mlp_post")


def attribution_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    *,
    site: str = "resid_pre",
    metric: Metric,
    layers: Sequence[int] | None = None,
    per_head: bool = False,
) -> PatchingResult:
    """Approximate ``activation_patching`` for every layer and position (or head) at once.

    Args:
        adapter: the model's adapter.
        clean, corrupt: one prompt each, of equal token length.
        site: ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``, ``mlp_in``,
            ``mlp_post`` or ``z``.
        metric: a :mod:`oculi.patching.metrics` metric.
        layers: layers to report (default all).
        per_head: for ``z``, one value per head (summed over positions): ``[n_layers, n_heads]``.

    Returns:
        A :class:`PatchingResult` whose ``values`` approximate the exact sweep's.
    """
    check_kind(site)
    if site not in _OUTPUT_SITES + _INPUT_SITES + ("z",):
        raise InputError(
            f"attribution patching supports {', '.join(_OUTPUT_SITES + _INPUT_SITES + ('z',))}; got {site!r}"
        )
    if per_head and site != "z":
        raise InputError("per_head=True needs site='z'")
    cb, kb = single_prompt(adapter, clean, "clean"), single_prompt(adapter, corrupt, "corrupt")
    check_aligned(adapter, cb, kb)
    metric = metric.bind(adapter)
    check_read_position(metric, cb, "clean")
    if metric.kind == "kl":
        pos = int(cb.attention_mask[0].nonzero()[:, 0][metric.position])
        metric = with_reference(metric, adapter.forward(cb.input_ids)[pos])
    layer_list = adapter.resolve_layers(layers)
    clean_value, clean_rec, _ = _metric_and_grads(
        adapter, cb, metric, site, layer_list, need_grad=False
    )
    corrupt_value, corrupt_acts, grads = _metric_and_grads(
        adapter, kb, metric, site, layer_list, need_grad=True
    )
    delta = clean_rec.to(grads.dtype) - corrupt_acts  # [n, T, width]
    contrib = delta * grads
    if site == "z":
        t = contrib.shape[1]
        contrib = contrib.reshape(len(layer_list), t, adapter.n_heads, adapter.d_head).sum(
            -1
        )  # [n, T, H]
        values = corrupt_value + (contrib.sum(1) if per_head else contrib.sum(-1))
        axis = "head" if per_head else "position"
    else:
        values = corrupt_value + contrib.sum(-1)
        axis = "position"
    tokens = prompt_tokens(adapter, kb)
    return PatchingResult(
        values.detach().cpu(),
        clean_value,
        corrupt_value,
        layer_list,
        axis,
        site,
        metric.name,
        tokens,
    )


def _metric_and_grads(
    adapter: Adapter,
    batch: Batch,
    metric: Metric,
    site: str,
    layers: tuple[int, ...],
    *,
    need_grad: bool,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Metric value, the site's activations ``[n, T, w]`` and their gradients (one backward)."""
    acts: dict[int, torch.Tensor] = {}
    anat = adapter.anatomy

    def keep(layer: int, x: torch.Tensor) -> None:
        acts[layer] = x

    def keep_arg(layer: int) -> Callable[[nn.Module, tuple], None]:
        return lambda _m, a: keep(layer, a[0])

    def keep_output(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        return lambda _m, _a, o: keep(layer, first_tensor(o))

    def keep_hidden(layer: int) -> Callable[[nn.Module, tuple, dict], None]:
        return lambda _m, a, kw: keep(layer, a[0] if a else kw["hidden_states"])

    with HookSet() as hooks, torch.enable_grad():
        for layer in layers:
            block = adapter.layer_modules[layer]
            if site == "resid_pre":
                hooks.forward_pre(block, keep_arg(layer))
            elif site == "resid_post":
                hooks.forward(block, keep_output(layer))
            elif site == "attn_out":
                src = (
                    adapter.part(layer, anat.attn_out_norm)
                    if anat.attn_out_norm
                    else adapter.part(layer, anat.attn)
                )
                hooks.forward(src, keep_output(layer))
            elif site == "mlp_out":
                src = (
                    adapter.part(layer, anat.mlp_out_norm)
                    if anat.mlp_out_norm
                    else adapter.part(layer, anat.mlp)
                )
                hooks.forward(src, keep_output(layer))
            else:
                path = {
                    "mlp_in": anat.mlp,
                    "mlp_post": f"{anat.mlp}.{anat.down_proj}",
                    "z": f"{anat.attn}.{anat.o_proj}",
                }[site]
                hooks.forward_pre_kwargs(adapter.part(layer, path), keep_hidden(layer))
        # the embedding output is the leaf that makes every later activation require grad
        embed = get_path(adapter.model, anat.embed)
        hooks.forward(embed, lambda _m, _a, o: o.detach().requires_grad_(need_grad))
        hidden = adapter.decoder(**batch.model_kwargs(), use_cache=False).last_hidden_state
        pos = int(batch.attention_mask[0].nonzero()[:, 0][metric.position])
        value = metric(unembed(adapter, hidden[:, pos], metric.columns()))[0]
        stacked = torch.stack([acts[layer][0] for layer in layers]).detach()
        if not need_grad:
            return float(value.detach()), stacked, torch.zeros_like(stacked)
        # autograd.grad, not backward(): nothing accumulates in the parameters' .grad
        grads = torch.autograd.grad(value, [acts[layer] for layer in layers], allow_unused=True)
    # allow_unused: a layer the metric does not depend on has no gradient (None)
    filled = [torch.zeros_like(acts[layer]) if g is None else g for layer, g in zip(layers, grads)]
    return float(value.detach()), stacked, torch.stack([g[0] for g in filled]).detach()
