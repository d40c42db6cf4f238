"""Integrated gradients (Sundararajan et al. 2017) over input tokens or a layer's residual.

The attribution of position ``t`` is

    IG_t = Σ_i (x − x')_{t,i} · ∫₀¹ ∂metric/∂x_{t,i} (x' + α (x − x')) dα

for the residual ``x`` entering layer ``layer`` (layer 0: the embedding as the first layer
receives it) and a baseline ``x'``: zeros, or the same residual of another prompt of the same
token length. The integral is the midpoint rule over ``steps`` points, all run as copies of one
forward and one backward (``batch_size`` at a time). Completeness — the attributions sum to
``metric(x) − metric(x')`` — holds up to the quadrature error, which the result reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from oculi.capture.hooks import HookSet, hidden_arg
from oculi.capture.interrupts import enable_grad, no_grad
from oculi.errors import InputError
from oculi.patching._common import (
    check_aligned,
    check_read_position,
    prompt_tokens,
    single_prompt,
)
from oculi.patching.metrics import Metric
from oculi.patching.resume import unembed

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


@dataclass
class IntegratedGradients:
    """Integrated-gradients attributions of one prompt.

    Attributes:
        values: ``[T]`` attribution per position (summed over the residual's width).
        per_dim: ``[T, d]`` attribution per position and residual dimension.
        tokens: the prompt's tokens.
        layer: the layer whose input was attributed (0: the embedding).
        value, baseline_value: the metric at the input and at the baseline.
        steps: quadrature points.
        completeness: ``{"sum": Σ values, "target": value − baseline_value, "gap": ...}``.
    """

    values: torch.Tensor
    per_dim: torch.Tensor
    tokens: list[str]
    layer: int
    value: float
    baseline_value: float
    steps: int
    completeness: dict[str, float] = field(default_factory=dict)

    def top(self, n: int = 5) -> list[tuple[int, str, float]]:
        """The ``n`` positions with the largest ``|IG|``: ``[(position, token, value)]``."""
        order = self.values.abs().argsort(descending=True)[:n].tolist()
        return [(p, self.tokens[p] if self.tokens else "", float(self.values[p])) for p in order]


def integrated_gradients(
    adapter: Adapter,
    prompt: Any,
    *,
    metric: Metric,
    baseline: Any = "zero",
    layer: int = 0,
    steps: int = 32,
    batch_size: int = 16,
) -> IntegratedGradients:
    """Integrated gradients of ``metric`` with respect to the residual entering ``layer``.

    Args:
        prompt: one prompt.
        metric: an :mod:`oculi.patching.metrics` metric (read at its position).
        baseline: ``"zero"`` or another prompt of the same token length (its residual at
            ``layer`` is the baseline, e.g. a corrupted prompt). Behind a scale-invariant norm
            (RMSNorm, LayerNorm) the metric barely moves along ``α x`` until ``α`` is tiny, so
            from a zero baseline the integrand piles up near 0 and the midpoint rule needs many
            steps; ``completeness["gap"]`` shows it. A corrupted prompt converges fast.
        layer: whose input residual is attributed; 0 attributes the input tokens.
        steps: midpoint-rule points along the straight path.

    Example::

        ig = integrated_gradients(adapter, "The Eiffel Tower is in the city of",
                                  metric=logit(" Paris"))
        ig.top(3); ig.completeness["gap"]
    """
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be ≥ 1, got {batch_size}")
    layer = adapter.resolve_layer(layer)
    batch = single_prompt(adapter, prompt, "prompt")
    if batch.padded:
        raise InputError("integrated_gradients takes one prompt without padding")
    metric = metric.bind(adapter)
    if metric.kind == "kl":
        raise InputError(
            "integrated_gradients needs a metric of the prompt alone (logit, logit_diff, "
            "probability, log_prob); kl compares two runs"
        )
    check_read_position(metric, batch, "attributed")
    t = batch.input_ids.shape[1]
    read = metric.position % t
    x = _residual(adapter, batch, layer)
    if isinstance(baseline, str) and baseline == "zero":
        x0 = torch.zeros_like(x)
    else:
        other = single_prompt(adapter, baseline, "baseline")
        check_aligned(adapter, batch, other)
        x0 = _residual(adapter, other, layer)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    grad_sum = torch.zeros_like(x)
    for start in range(0, steps, batch_size):
        a = alphas[start : start + batch_size]
        points = x0 + a.view(-1, 1, 1) * (x - x0)  # [n, T, d]
        leaf = points.detach().requires_grad_(True)
        with enable_grad():
            along = _metric_at(adapter, batch, metric, layer, leaf, read)
            (grad,) = torch.autograd.grad(along.sum(), [leaf])
        grad_sum += grad.sum(0)
    per_dim = ((x - x0) * grad_sum / steps).detach()
    with no_grad():
        ends = _metric_at(adapter, batch, metric, layer, torch.stack([x, x0]), read)
    value, base = float(ends[0]), float(ends[1])
    total = float(per_dim.sum())
    return IntegratedGradients(
        per_dim.sum(-1).float().cpu(),
        per_dim.float().cpu(),
        prompt_tokens(adapter, batch),
        layer,
        value,
        base,
        steps,
        {"sum": total, "target": value - base, "gap": total - (value - base)},
    )


def _residual(adapter: Adapter, batch: Any, layer: int) -> torch.Tensor:
    """The residual entering ``layer`` for a one-prompt batch, ``[T, d]``."""
    seen: list[torch.Tensor] = []

    def keep(_m: Any, args: tuple, kwargs: dict) -> None:
        seen.append(hidden_arg(args, kwargs)[0].detach())

    with no_grad(), HookSet() as hooks:
        hooks.forward_pre_kwargs(adapter.layer_modules[layer], keep)
        adapter.decoder(**batch.model_kwargs(), use_cache=False)
    return seen[0]


def _metric_at(
    adapter: Adapter, batch: Any, metric: Metric, layer: int, x: torch.Tensor, read: int
) -> torch.Tensor:
    """The metric per row when the residual entering ``layer`` is ``x [n, T, d]``."""
    n = x.shape[0]

    def swap(_m: Any, args: tuple, kwargs: dict) -> Any:
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    kw = {k: v.expand(n, -1) for k, v in batch.model_kwargs().items()}
    with HookSet() as hooks:
        hooks.forward_pre_kwargs(adapter.layer_modules[layer], swap)
        hidden = adapter.decoder(**kw, use_cache=False).last_hidden_state
    return metric(unembed(adapter, hidden[:, read], metric.columns())).float()
