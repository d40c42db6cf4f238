"""Attribution figures: which heads and layers write the answer (direct logit attribution).

::

    dla = AttributionMethods.direct_logit_attribution(full, target_id)
    head_attribution_bars(dla, k=15)      # the heads with the largest |share|, signed
    layer_attribution(dla)                # attention and MLP share per layer

Both accept the attribution result or plain tensors (``[L, H]``; ``[L]`` and ``[L]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from oculi.visualize._common import array, new_axes


def top_heads(heads: Any, k: int, layers: Sequence[int] | None = None) -> list[tuple[str, float]]:
    """The ``k`` heads with the largest ``|value|``, as ``("L{l}H{h}", value)``, largest first.

    ::

        top_heads(torch.tensor([[0.1, -2.0], [0.5, 0.0]]), k=2)   # heads [L, H]
        # [("L0H1", -2.0), ("L1H0", 0.5)]
    """
    grid = array(getattr(heads, "heads", heads))
    if grid.ndim != 2:
        raise ValueError(f"head values must be [L, H], got shape {grid.shape}")
    names = list(layers) if layers is not None else list(range(grid.shape[0]))
    order = abs(grid).flatten().argsort()[::-1][:k]
    n_heads = grid.shape[1]
    return [(f"L{names[i // n_heads]}H{i % n_heads}", float(grid.flat[i])) for i in order]


def head_attribution_bars(
    heads: Any, *, k: int = 20, layers: Sequence[int] | None = None, ax: Any = None
) -> Any:
    """Horizontal bars of the ``k`` heads that matter most, signed (blue up, red down); Axes.

    ::

        head_attribution_bars(AttributionMethods.head_attribution(full, target), k=10)  # heads [L, H]
    """
    items = top_heads(heads, k, layers)
    ax = new_axes(ax, 6.0, max(3.0, 0.28 * len(items) + 1.2))
    names = [name for name, _ in items][::-1]
    values = [value for _, value in items][::-1]
    ax.barh(names, values, color=["#2563eb" if v >= 0 else "#dc2626" for v in values])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("contribution to the target logit")
    ax.set_title(f"top {len(items)} heads by |attribution|")
    return ax


def layer_attribution(
    attribution: Any, mlp: Any = None, *, layers: Sequence[int] | None = None, ax: Any = None
) -> Any:
    """Side-by-side bars: each layer's attention and MLP share of the target logit; Axes.

    Args:
        attribution: a result with ``.attention`` and ``.mlp`` ``[L]``, or the attention
            shares ``[L]`` (then pass ``mlp``).
        mlp: the MLP shares ``[L]`` when ``attribution`` is a tensor.
    """
    attn = array(getattr(attribution, "attention", attribution))
    mlp_values = array(mlp if mlp is not None else attribution.mlp)
    names = list(layers) if layers is not None else list(range(len(attn)))
    ax = new_axes(ax, max(6.0, 0.4 * len(names) + 2), 3.5)
    x = list(range(len(names)))
    ax.bar([i - 0.2 for i in x], attn, width=0.4, label="attention", color="#2563eb")
    ax.bar([i + 0.2 for i in x], mlp_values, width=0.4, label="MLP", color="#d97706")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, [str(n) for n in names])
    ax.set_xlabel("layer")
    ax.set_ylabel("contribution to the target logit")
    ax.legend()
    return ax
