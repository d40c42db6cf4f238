"""Attention rollout and flow (Abnar & Zuidema 2020), value-weighted attention (Kobayashi 2020).

::

    rollout = attention_rollout(full.attention)        # .values [L, T, T]
    flow = attention_flow(full.attention, position=-1)  # .values [T]
    vw = value_weighted_attention(full.attention, adapter)  # .values [L, H, T, T]

Rollout and flow follow the paper: each layer's attention, averaged over heads, is mixed with
the residual connection as ``Â = 0.5·Ā + 0.5·I`` (rows still sum to 1). **Rollout** multiplies
these through the layers, ``R_l = Â_l R_{l-1}``: ``R_l[i, j]`` is how much position ``i`` after
layer ``l`` derives from input token ``j`` if attention mixed linearly. **Flow** treats the
layers as a graph, nodes ``(layer, position)`` with an edge of capacity ``Â_l[i, j]`` from
``(l, j)`` to ``(l + 1, i)``, and takes the maximum flow from each input token to one position
at the top (SciPy's compiled max-flow by default, networkx's on request). Both read the patterns only.

**Value-weighted attention** is ``‖α_ij · v_j W_O^h‖``: the size of what head ``h`` moves from
key ``j`` to query ``i``, not only how much it attends (values of small norm move little). It
needs the output projections (``HeadWeights``, with the attention-output norm's gain folded;
see :mod:`oculi.analysis.weights`); without weights it falls back to ``‖α_ij · v_j‖`` and says
so in ``.note``.

Batched captures are handled per sequence on its real tokens; padded positions are ``NaN``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from oculi.analysis._common import attention_of, field, is_batched, real_mask, real_positions
from oculi.analysis.dla import AttributionResult
from oculi.errors import InputError, MissingExtraError


def _residual_mixed(pattern: Tensor, head_reduction: str, residual: bool) -> Tensor:
    """``[L, H, t, t]`` -> ``Â [L, t, t]`` (float64)."""
    if head_reduction == "mean":
        a = pattern.double().mean(1)
    elif head_reduction == "max":
        a = pattern.double().amax(1)
        a = a / a.sum(-1, keepdim=True)
    else:
        raise ValueError(f"head_reduction must be 'mean' or 'max', got {head_reduction!r}")
    if residual:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a


def _rows(patterns: Tensor, metadata: dict[str, Any], batched: bool) -> list[tuple[Tensor, Tensor]]:
    """Each row's patterns cut to its real tokens, with the kept indices."""
    rows = patterns if batched else patterns[None]
    n_pos = patterns.shape[-1]
    real = real_mask(metadata, rows.shape[0] if batched else None, n_pos)
    out = []
    for b in range(rows.shape[0]):
        keep = (
            torch.arange(n_pos) if real is None else real[b if batched else 0].nonzero().flatten()
        )
        out.append((rows[b][..., keep[:, None], keep[None, :]], keep))
    return out


def attention_rollout(
    capture: Any, *, residual: bool = True, head_reduction: str = "mean"
) -> AttributionResult:
    """Attention rollout through the captured layers: ``.values [L, T, T]`` (``[B, L, T, T]``).

    Args:
        capture: an ``AttentionCapture`` (or ``FullCapture``) with patterns of consecutive
            layers from the first (rollout composes them in order).
        residual: mix in the residual connection, ``0.5·A + 0.5·I`` (the paper's choice).
        head_reduction: ``"mean"`` (the paper) or ``"max"`` over heads (rows renormalised).
    """
    att = attention_of(capture)
    patterns = field(att, "patterns")
    batched = is_batched(patterns, "patterns")
    _check_consecutive(att.layers)
    out = torch.full(
        (*patterns.shape[:-4], patterns.shape[-4], *patterns.shape[-2:]),
        float("nan"),
        dtype=torch.float64,
    )
    for b, (p, keep) in enumerate(_rows(patterns, att.metadata, batched)):
        a = _residual_mixed(p, head_reduction, residual)
        rolled = torch.empty_like(a)
        acc = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        for i in range(a.shape[0]):
            acc = a[i] @ acc
            rolled[i] = acc
        target = out[b] if batched else out
        target[:, keep[:, None], keep[None, :]] = rolled.cpu()
    return AttributionResult(values=out, layers=tuple(att.layers), metadata={"method": "rollout"})


def _check_consecutive(layers: Any) -> None:
    if tuple(layers) != tuple(range(len(layers))):
        raise InputError(
            f"rollout and flow compose layers from the first one; this capture holds layers "
            f"{list(layers)} (capture every layer from 0)"
        )


def _networkx() -> Any:
    try:
        import networkx
    except ImportError:  # pragma: no cover - the stats extra installs it
        raise MissingExtraError(
            "attention flow uses networkx; install with `pip install 'oculi[stats]'`"
        ) from None
    return networkx


def attention_flow(
    capture: Any,
    position: int = -1,
    *,
    residual: bool = True,
    head_reduction: str = "mean",
    backend: str = "scipy",
) -> AttributionResult:
    """Maximum attention flow from each input token to ``position`` at the top layer.

    Args:
        capture: an ``AttentionCapture`` (or ``FullCapture``) of one sequence, patterns of
            every layer from 0.
        position: the output position (counted among real tokens; ``-1``: the last).
        residual, head_reduction: as in :func:`attention_rollout`.
        backend: ``"scipy"`` (``scipy.sparse.csgraph.maximum_flow``, compiled; capacities
            are integers, so they are scaled by ``2^30`` and rounded: the flow is exact to
            about ``1e-6``) or ``"networkx"`` (float capacities, pure Python: seconds per
            input token on long prompts).

    Returns:
        ``.values [T]``: the flow from each input token (0 after ``position``, which it
        cannot reach in a causal model).
    """
    if backend not in ("scipy", "networkx"):
        raise ValueError(f"backend must be 'scipy' or 'networkx', got {backend!r}")
    att = attention_of(capture)
    patterns = field(att, "patterns")
    if is_batched(patterns, "patterns"):
        raise InputError("attention_flow reads one sequence; capture one prompt")
    _check_consecutive(att.layers)
    ((p, keep),) = _rows(patterns, att.metadata, False)
    t = real_positions(att.metadata, None, patterns.shape[-1], [position])[0, 0]
    top = int((keep == t).nonzero()[0, 0])
    a = _residual_mixed(p[..., : top + 1, : top + 1], head_reduction, residual).cpu()
    flows = _flows_scipy(a, top) if backend == "scipy" else _flows_networkx(a, top)
    values = torch.zeros(patterns.shape[-1], dtype=torch.float64)
    values[keep[: top + 1]] = flows
    return AttributionResult(
        values=values,
        layers=tuple(att.layers),
        metadata={"method": "flow", "position": position, "index": int(t), "backend": backend},
    )


def _edges(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edges ``(l, j) -> (l + 1, i)`` with capacity ``a[l, i, j] > 0``, as node ids ``l·n + i``."""
    n = a.shape[-1]
    layer, rows, cols = torch.nonzero(a > 0, as_tuple=True)
    return layer * n + cols, (layer + 1) * n + rows, a[layer, rows, cols]


def _flows_scipy(a: Tensor, top: int) -> Tensor:
    try:
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import maximum_flow
    except ImportError:  # pragma: no cover - the stats extra installs scipy
        raise MissingExtraError(
            "attention flow uses SciPy; install with `pip install 'oculi[stats]'`"
        ) from None
    n_layers, n = a.shape[0], a.shape[-1]
    src, dst, cap = _edges(a)
    scale = 2**30
    ints = (cap * scale).round().to(torch.int32).numpy()
    size = (n_layers + 1) * n
    graph = csr_array((ints, (src.numpy(), dst.numpy())), shape=(size, size))
    sink = n_layers * n + top
    out = [maximum_flow(graph, j, sink, method="dinic").flow_value / scale for j in range(n)]
    return torch.tensor(out, dtype=torch.float64)


def _flows_networkx(a: Tensor, top: int) -> Tensor:
    nx = _networkx()
    n_layers, n = a.shape[0], a.shape[-1]
    graph = nx.DiGraph()
    graph.add_nodes_from(range((n_layers + 1) * n))
    src, dst, cap = _edges(a)
    graph.add_edges_from((int(s), int(d), {"capacity": float(c)}) for s, d, c in zip(src, dst, cap))
    sink = n_layers * n + top
    return torch.tensor(
        [nx.maximum_flow_value(graph, j, sink) for j in range(n)], dtype=torch.float64
    )


def value_weighted_attention(capture: Any, weights: Any = None) -> AttributionResult:
    """``‖α_ij · v_j W_O^h‖`` per head: ``.values [L, H, T, T]`` (``[B, L, H, T, T]``).

    Args:
        capture: an ``AttentionCapture`` (or ``FullCapture``) with patterns and values.
        weights: the adapter or :class:`~oculi.analysis.weights.HeadWeights` (for ``W_O``);
            ``None`` uses ``‖α_ij · v_j‖`` (noted in ``.note``).
    """
    att = attention_of(capture)
    patterns, values = field(att, "patterns"), field(att, "values")
    batched = is_batched(patterns, "patterns")
    n_heads, n_kv = patterns.shape[-3], values.shape[-3]
    v = values.repeat_interleave(n_heads // n_kv, dim=-3)  # [(B,) L, H, T, D]
    note = ""
    if weights is None:
        norms = v.norm(dim=-1)
        note = "no weights given: ‖α·v‖ (pass the adapter for ‖α·v·W_O‖)"
    else:
        from oculi.analysis.weights import weights_of

        # ‖v W_O‖² = v (W_O W_Oᵀ) vᵀ: a D×D Gram per head, computed once per HeadWeights
        gram = weights_of(weights).o_gram[list(att.layers)].to(v.device, v.dtype)  # [L, H, D, D]
        norms = ((v @ gram) * v).sum(-1).clamp(min=0).sqrt()
    out = patterns * norms.unsqueeze(-2)  # [.., L, H, T(query), T(key)]
    if batched:
        real = real_mask(att.metadata, patterns.shape[0], patterns.shape[-1])
        if real is not None:
            out = out.masked_fill(~real[:, None, None, :, None], float("nan"))
    return AttributionResult(
        values=out, layers=tuple(att.layers), note=note, metadata={"method": "value_weighted"}
    )
