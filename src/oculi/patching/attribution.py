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

from oculi.capture.bridge import LayerTaps, attention_bridge
from oculi.capture.hooks import HookSet
from oculi.capture.inputs import Batch
from oculi.capture.interrupts import enable_grad
from oculi.capture.places import add_replacer
from oculi.capture.sites import PER_HEAD, SITE_KINDS
from oculi.errors import InputError
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
from oculi.patching.writers import check_patchable

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def attribution_patching(
    adapter: Adapter,
    clean: Any,
    corrupt: Any,
    *,
    site: str | tuple[str, Any] = "resid_pre",
    metric: Metric,
    layers: Sequence[int] | None = None,
    per_head: bool = False,
) -> PatchingResult:
    """Approximate ``activation_patching`` for every layer and position (or head) at once.

    Args:
        adapter: the model's adapter.
        clean, corrupt: one prompt each, of equal token length.
        site: any site :func:`~oculi.patching.activation_patching` patches (``resid_pre``,
            ``attn_out``, ``z``, ``q``, ``pattern``, ``mlp_post``, ...); the gradient is taken
            where that site is written. ``("sae", sae)``: the latents of an
            :class:`oculi.sae.SAE` (gradient at the latents of the SAE spliced with its error
            term), ``values [T, d_sae]`` (see :func:`oculi.sae.sae_attribution_patching`).
        metric: a :mod:`oculi.patching.metrics` metric.
        layers: layers to report (default all).
        per_head: for per-head sites (``z``, ``q``, ``k``, ``v``, ``pattern``, ``q_pre``,
            ``k_pre``), one value per head (summed over positions): ``[n_layers, n_heads]``
            (``n_kv_heads`` for ``k``, ``v``, ``k_pre``). Otherwise one value per position
            (for ``k``, ``v``: key position; summed over heads for per-head sites).

    Returns:
        A :class:`PatchingResult` whose ``values`` approximate the exact sweep's.

    Works under ``torch.no_grad()`` and ``torch.inference_mode()``: gradients are enabled
    locally.
    """
    if torch.is_inference_mode_enabled():  # gradients need tensors made outside it
        with torch.inference_mode(False):
            return attribution_patching(
                adapter, clean, corrupt, site=site, metric=metric, layers=layers, per_head=per_head
            )
    if next(adapter.model.parameters()).is_inference():
        raise InputError(
            "attribution_patching needs gradients, but the model's weights were created under "
            "torch.inference_mode() (inference tensors never take part in autograd); load the "
            "model outside inference_mode"
        )
    if not isinstance(site, str):
        from oculi.sae.patching import sae_attribution_patching, sae_of_site

        sae = sae_of_site(site, layers=layers, per_head=per_head)
        return sae_attribution_patching(adapter, clean, corrupt, sae, metric=metric)
    kind = check_patchable(adapter, site)
    if per_head and not kind.per_head:
        raise InputError(
            f"per_head=True needs a per-head site ({', '.join(PER_HEAD)}), got {site!r}"
        )
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
    delta = clean_rec.to(grads.dtype) - corrupt_acts  # [n, T, W] or [n, H, T, W]
    contrib = (delta * grads).sum(-1)
    if kind.per_head:  # [n, H, T]: one value per head, or per position over all heads
        values = corrupt_value + (contrib.sum(2) if per_head else contrib.sum(1))
    else:
        values = corrupt_value + contrib
    axis = "head" if per_head else "position"
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
    """Metric value, the site's activations ``[n, ...]`` and their gradients (one backward).

    The gradient is taken where the site is written (its locator's ``write`` place): the hook
    swaps the tensor there for a copy that only the site's path reads, so a change of the
    copy is exactly what a patch of the site changes.
    """
    place = SITE_KINDS[site].locate(adapter).write
    assert place is not None  # check_patchable refused unwritable sites
    copies: dict[int, torch.Tensor] = {}

    def keeper(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def keep(x: torch.Tensor) -> torch.Tensor:
            copies[layer] = x.clone()
            return copies[layer]

        return keep

    def site_of(x: torch.Tensor) -> torch.Tensor:
        return (place.view(x) if place.view else x)[0]

    taps: dict[int, LayerTaps] = {}
    with HookSet() as hooks, enable_grad():
        for layer in layers:
            add_replacer(hooks, taps, adapter, layer, place, keeper(layer))
        if taps:
            hooks.enter(
                attention_bridge(adapter.attention_configs, adapter.attention_layer_ids, taps)
            )
        # the embedding output is the leaf that makes every later activation require grad
        embed = adapter.module(adapter.anatomy.embed)
        hooks.forward(embed, lambda _m, _a, o: o.detach().requires_grad_(need_grad))
        hidden = adapter.decoder(**batch.model_kwargs(), use_cache=False).last_hidden_state
        pos = int(batch.attention_mask[0].nonzero()[:, 0][metric.position])
        value = metric(unembed(adapter, hidden[:, pos], metric.columns()))[0]
        stacked = torch.stack([site_of(copies[layer]) for layer in layers]).detach()
        if not need_grad:
            return float(value.detach()), stacked, torch.zeros_like(stacked)
        # autograd.grad, not backward(): nothing accumulates in the parameters' .grad
        grads = torch.autograd.grad(value, [copies[layer] for layer in layers], allow_unused=True)
    # allow_unused: a layer the metric does not depend on has no gradient (None)
    filled = [
        torch.zeros_like(copies[layer]) if g is None else g for layer, g in zip(layers, grads)
    ]
    return float(value.detach()), stacked, torch.stack([site_of(g) for g in filled]).detach()
