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

The exact flow is found in two steps: a family of cuts bounds every token's flow at once
(:func:`cut_bounds`), and a max flow on the graph without its small edges that meets the
bound proves it (a flow and a cut of equal value are both optimal); tokens left unproven are
solved on denser graphs, the last being the whole one. ``method="cut"`` returns the bound
alone, a stated upper bound, about 20 times faster on Gemma 3 270M.

**Value-weighted attention** is ``‖α_ij · v_j W_O^h‖``: the size of what head ``h`` moves from
key ``j`` to query ``i``, not only how much it attends (values of small norm move little). It
needs the output projections (``HeadWeights``, with the attention-output norm's gain folded;
see :mod:`oculi.analysis.weights`); without weights it falls back to ``‖α_ij · v_j‖`` and says
so in ``.note``.

Batched captures are handled per sequence on its real tokens; padded positions are ``NaN``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Shaped
from torch import Tensor

from oculi.analysis._common import (
    as_positions,
    attention_of,
    field,
    is_batched,
    real_mask,
    real_positions,
)
from oculi.analysis.result import AttributionResult
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
    position: int | Sequence[int] = -1,
    *,
    residual: bool = True,
    head_reduction: str = "mean",
    backend: str = "scipy",
    method: str = "exact",
) -> AttributionResult:
    """Maximum attention flow from each input token to ``position`` at the top layer.

    Args:
        capture: an ``AttentionCapture`` (or ``FullCapture``), patterns of every layer from
            0; a padded batch is taken row by row on its real tokens.
        position: the output position (counted among real tokens; ``-1``: the last), or a
            list of them.
        residual, head_reduction: as in :func:`attention_rollout`.
        backend: ``"scipy"`` (``scipy.sparse.csgraph.maximum_flow``, compiled; capacities
            are integers, so they are scaled by ``2^30`` and rounded: the flow is exact to
            about ``1e-6``) or ``"networkx"`` (float capacities, pure Python: seconds per
            input token on long prompts).
        method: ``"exact"`` (the max flow) or ``"cut"``: the smallest of a family of cuts
            (:func:`cut_bounds`), for every token in O(L·T²). A cut bounds the flow from
            above, so ``"cut"`` is never below the exact value and equals it whenever the
            minimum cut is in the family; ``.note`` says so. On Gemma 3 270M it equalled the
            exact flow for 725 of 729 tokens, on random weights for 524 of 635 (docs/benchmarks.md,
            "Attention flow"): a bound, not the flow.

    Returns:
        ``.values [T]`` (``[P, T]`` for a list of positions; ``[B, ...]`` for a batch, padding
        ``NaN``): the flow from each input token (0 after the position, which it cannot
        reach in a causal model).
        ``.metadata["proven"]`` (exact, SciPy) counts the tokens whose flow on a pruned graph
        met a cut, and those solved on a denser or the whole graph.
    """
    if backend not in ("scipy", "networkx"):
        raise ValueError(f"backend must be 'scipy' or 'networkx', got {backend!r}")
    if method not in ("exact", "cut"):
        raise ValueError(f"method must be 'exact' or 'cut', got {method!r}")
    att = attention_of(capture)
    patterns = field(att, "patterns")
    batched = is_batched(patterns, "patterns")
    _check_consecutive(att.layers)
    one, positions = as_positions(position)
    if not positions:
        raise InputError("position must be an int or a non-empty list of ints")
    rows = _rows(patterns, att.metadata, batched)
    n_pos = patterns.shape[-1]
    index = real_positions(att.metadata, len(rows) if batched else None, n_pos, positions)
    values = torch.full((len(rows), len(positions), n_pos), float("nan"), dtype=torch.float64)
    proven: dict[str, int] = {}
    for b, (p, keep) in enumerate(rows):
        mixed = _residual_mixed(p, head_reduction, residual).cpu()
        values[b, :, keep] = 0.0  # real tokens after the position cannot reach it
        for row, t in enumerate(index[b].tolist()):
            top = int((keep == t).nonzero()[0, 0])
            a = mixed[:, : top + 1, : top + 1]
            if method == "cut":
                flows = cut_bounds(a.tril())
            elif backend == "scipy":
                flows, counts = _flows_scipy(a, top)
                proven = {k: proven.get(k, 0) + v for k, v in counts.items()}
            else:
                flows = _flows_networkx(a, top)
            values[b, row, keep[: top + 1]] = flows
    out = values[:, 0] if one else values
    metadata: dict[str, Any] = {
        "method": "flow" if method == "exact" else "flow-cut",
        "position": positions[0] if one else positions,
        "index": (index if batched else index[0])[..., 0 if one else slice(None)].tolist(),
        "backend": backend if method == "exact" else None,
    }
    if proven:
        metadata["proven"] = proven
    note = "an upper bound of the flow: the smallest of a family of cuts" if method == "cut" else ""
    return AttributionResult(
        values=out if batched else out[0], layers=tuple(att.layers), note=note, metadata=metadata
    )


def _edges(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edges ``(l, j) -> (l + 1, i)`` with capacity ``a[l, i, j] > 0``, as node ids ``l·n + i``."""
    n = a.shape[-1]
    layer, rows, cols = torch.nonzero(a > 0, as_tuple=True)
    return layer * n + cols, (layer + 1) * n + rows, a[layer, rows, cols]


def cut_bounds(w: Shaped[Tensor, "layer pos pos"]) -> Shaped[Tensor, " pos"]:
    """Upper bounds of the flow from every source ``s`` to the last token: ``[T]``.

    ``w [L, T, T]`` holds the capacities of the edges ``(l, j) -> (l + 1, i)``, causal, cut
    to the output position (the sink is ``(L, T - 1)``). Every set ``S`` of nodes holding the
    source and not the sink is a cut, and its capacity (the edges leaving ``S``) bounds the
    flow. The smallest of two families is taken, for all sources together in O(L·T²):

    - windows: ``S_l`` is every token ``>= s`` before layer ``m``, the tokens ``[s, θ)``
      from layer ``m`` to ``e``, and none after ``e`` (or, with ``e = L``, every node of the
      last layer but the sink), for every ``1 <= m <= e`` and ``s <= θ < T``. ``θ = s`` gives
      the layer cuts, ``m = 1`` the source's own edges, and ``θ = s + 1`` a path along the
      source token's own position;
    - every reachable node but the sink (the sink's edges from tokens ``>= s``).

    Integer ``w`` gives exact integer capacities.
    """
    n_layers, n = w.shape[0], w.shape[-1]
    top = n - 1
    suffix = lambda x, dim: x.flip(dim).cumsum(dim).flip(dim)  # noqa: E731 - Σ from here up
    sink = suffix(w[n_layers - 1, top], 0)  # [s]: Σ_{j >= s} w[L-1, top, j]
    if n_layers == 1:
        return w[0, top]  # the source's one edge to the sink is the whole graph
    tokens = torch.arange(n)
    within = lambda x: x[None, :] - x[:, None]  # noqa: E731 - [θ, s]: Σ over j in [s, θ)
    # cost of the cut edges into layers <= l, the window [s, θ) open at layer l
    opened = suffix(w[0], 0)  # layer 1's window: the source's edges to tokens >= θ
    best = torch.full_like(
        opened, float("inf") if w.is_floating_point() else torch.iinfo(w.dtype).max
    )
    for layer in range(1, n_layers - 1):  # one layer at a time: O(T²) memory
        whole = suffix(suffix(w[layer], 0), 1)  # [θ, s]: Σ_{i >= θ} Σ_{j >= s} w[layer, i, j]
        across = whole - whole[tokens, tokens][:, None]  # Σ_{i >= θ} Σ_{s <= j < θ}
        leaving = suffix(w[layer].sum(0), 0)  # [s]: every edge out of the tokens >= s
        best = torch.minimum(best, opened + within(leaving))  # none after this layer
        opened = torch.minimum(opened + across, whole)  # open on, or open now
    best = torch.minimum(best, opened + within(sink))  # the last layer: only the sink's edges
    best = best.masked_fill(tokens[:, None] < tokens[None, :], best.max())  # θ < s: no window
    return torch.minimum(best.amin(0), sink)


# pruning thresholds tried before the whole graph, as fractions of a capacity of 1
_PRUNE = (1e-2, 1e-3)
# sources in blocks of this many tokens share a first graph cut to the tokens they reach
_BLOCK = 16


def _flows_scipy(a: Tensor, top: int) -> tuple[Tensor, dict[str, int]]:
    """Exact max flow from every input token, integer capacities ``round(Â · 2^30)``.

    A flow found on a graph without the small edges is a flow of the whole graph; when its
    value equals one of :func:`cut_bounds` (integers, compared exactly), that cut proves it
    maximal, and it is the value the whole graph's max flow has. Sources not proven this way
    are solved again on a denser graph, and last on the whole one.
    """
    try:
        from scipy.sparse import csr_array
        from scipy.sparse.csgraph import maximum_flow
    except ImportError:  # pragma: no cover - the stats extra installs scipy
        raise MissingExtraError(
            "attention flow uses SciPy; install with `pip install 'oculi[stats]'`"
        ) from None
    n_layers, n = a.shape[0], a.shape[-1]
    scale = 2**30
    ints = (a * scale).round().to(torch.int64).tril()
    bound = cut_bounds(ints).tolist()
    whole = ints > 0
    levels = [whole & (ints >= int(fraction * scale)) for fraction in _PRUNE] + [whole]
    for keep in levels[:-1]:  # the source's and the sink's edges stay: the cuts use them
        keep[0], keep[n_layers - 1, top] = whole[0], whole[n_layers - 1, top]

    @functools.cache
    def graph(level: int, first: int) -> Any:
        """Level ``level``'s graph over tokens ``>= first`` (the only ones reachable)."""
        keep, caps = levels[level][:, first:, first:], ints[:, first:, first:]
        width = n - first
        layer, rows, cols = keep.nonzero(as_tuple=True)
        ids = ((layer * width + cols).numpy(), ((layer + 1) * width + rows).numpy())
        size = (n_layers + 1) * width
        return csr_array((caps[layer, rows, cols].to(torch.int32).numpy(), ids), (size, size))

    names = [f"edges >= {fraction:g}" for fraction in _PRUNE] + ["whole graph"]
    out, proven = [], dict.fromkeys(names, 0)
    for s in range(n):
        for level, name in enumerate(names):
            base = s - s % _BLOCK if level == 0 else 0
            sink = n_layers * (n - base) + top - base
            value = maximum_flow(graph(level, base), s - base, sink, method="dinic").flow_value
            if value == bound[s] or level == len(names) - 1:
                proven[name] += 1
                break
        out.append(value / scale)
    return torch.tensor(out, dtype=torch.float64), proven


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
