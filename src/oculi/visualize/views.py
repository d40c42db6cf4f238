"""HTML views of oculi's results: the sections of the report, and what Jupyter shows.

::

    res = oculi.causal_tracing(adapter, prompt, subject, target)
    res            # in Jupyter: the tracing grid, coloured, every cell's value in a tooltip
    from oculi.visualize import views
    views.attention_view(capture, tokens=adapter.to_str_tokens(prompt))   # head picker + hover

Each function returns an HTML fragment (no ``<html>`` page); :func:`notebook` wraps one with
the stylesheet (and the script, for the interactive views) so it renders on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from oculi.visualize._common import array
from oculi.visualize.html import bar_list, esc, fragment, grid_table, json_script, line_chart

_PATTERN_DIGITS = 3


def _cols(tokens: Sequence[str], n: int, marks: Sequence[int] = ()) -> list[str]:
    if not tokens:
        return [str(i) for i in range(n)]
    marked = set(marks)
    return [f"{i} {t}" + ("*" if i in marked else "") for i, t in enumerate(tokens)]


def notebook(body: str, *, interactive: bool = False) -> str:
    """A view as a standalone notebook output (styles, and the script when interactive)."""
    return fragment(body, interactive=interactive)


def tracing_view(result: Any) -> str:
    """Causal tracing: ``p(target)`` per restored (layer, position), subject marked ``*``."""
    values = result.values
    note = (
        f"p(target) with one clean state restored into the corrupted run ({esc(result.kind)}, "
        f"window {result.window}); clean p = {result.clean_prob:.3f}, corrupted p = "
        f"{result.corrupt_prob:.3f}. Columns marked * were corrupted; blue cells bring the "
        "probability back up, red ones push it further down."
    )
    grid = grid_table(
        values,
        [f"L{i}" for i in range(values.shape[0])],
        _cols(result.tokens, values.shape[1], result.subject_positions),
        fmt="{:.3f}",
        corner="layer \\ position",
        diverging=True,
        shade=values - result.corrupt_prob,
    )
    return f'<div class="oc-tracing"><p class="oc-note">{note}</p>{grid}</div>'


def patching_view(result: Any) -> str:
    """Activation patching: recovery per layer and position (or head), 0 = corrupt, 1 = clean."""
    try:
        values, what = result.normalized(), "recovery (0: corrupt run, 1: clean run)"
    except ValueError:
        values, what = result.values, f"{result.metric} (recovery undefined: clean = corrupt)"
    if values.dim() == 1:
        values = values[:, None]
    if result.axis == "head":
        cols = [f"H{h}" for h in range(values.shape[1])]
    elif result.axis == "position":
        cols = _cols(result.tokens, values.shape[1])
    else:
        cols = [result.metric]
    note = (
        f"{esc(result.site)} patching, {esc(what)}; clean {result.clean_metric:.3f}, corrupt "
        f"{result.corrupt_metric:.3f}."
    )
    grid = grid_table(
        values, [f"L{layer}" for layer in result.layers], cols, diverging=True, corner="layer"
    )
    return f'<div class="oc-patching"><p class="oc-note">{note}</p>{grid}</div>'


def lens_result_view(result: Any) -> str:
    """A target followed through the layers: its probability, rank and each layer's top-1."""
    layers = list(result.layers)
    chart = line_chart({f"p({result.target})": array(result.probs).tolist()}, layers)
    rows = "".join(
        f'<tr><td>L{layer}</td><td><span class="oc-tok">{esc(top)}</span></td>'
        f'<td data-v="{float(p)!r}">{float(p):.3f}</td><td>{int(r)}</td></tr>'
        for layer, top, p, r in zip(layers, result.top1, result.probs.tolist(), result.ranks)
    )
    cross = result.crossover_layer
    note = (
        f"{esc(repr(result.target))} becomes and stays the top-1 prediction at layer {cross}"
        if cross is not None
        else f"{esc(repr(result.target))} is not the top-1 prediction at the last layer read"
    )
    table = (
        '<table class="oc-list"><tr><th>layer</th><th>top-1</th><th>p(target)</th>'
        f"<th>rank</th></tr>{rows}</table>"
    )
    return (
        f'<div class="oc-lens"><p class="oc-note">{note}.</p>'
        f'<div class="oc-row"><div>{chart}</div><div>{table}</div></div></div>'
    )


def lens_grid_view(
    tokens: Sequence[str],
    layers: Sequence[int],
    top: Sequence[Sequence[Sequence[tuple[str, float]]]],
) -> str:
    """The logit lens over layers (down) and positions (across): each cell shows that layer's
    top-1 next token at that position, coloured by its probability; hovering a cell lists the
    top-k in the side panel.

    Args:
        tokens: the prompt's tokens.
        layers: the model layers of the rows.
        top: ``top[l][t]`` = ``[(token, prob), ...]`` best first.
    """
    probs = [[cell[0][1] for cell in row] for row in top]
    text = [[cell[0][0] for cell in row] for row in top]
    last = len(tokens) - 1

    def attrs(r: int, c: int) -> str:
        mark = " data-last" if r == len(layers) - 1 and c == last else ""
        return f'data-l="{r}" data-t="{c}"{mark}'

    grid = grid_table(
        probs, [f"L{layer}" for layer in layers], _cols(tokens, len(tokens)),
        text=text, cell_attrs=attrs, scale=1.0, corner="layer \\ position",
    )  # fmt: skip
    payload = {"tokens": list(tokens), "layers": list(layers), "top": _rounded(top)}
    return (
        f'<div class="oc-row" data-oculi="lens">{json_script(payload)}'
        f'<div>{grid}</div><div class="oc-detail"></div></div>'
    )


def _rounded(top: Any) -> Any:
    return [[[(tok, round(float(p), 5)) for tok, p in cell] for cell in row] for row in top]


def attention_view(
    heads: Sequence[tuple[str, str, Any]],
    tokens: Sequence[str],
    *,
    buttons: int = 8,
) -> str:
    """Attention patterns with a head picker; hovering a token (or a matrix row) colours every
    token by how much attention that query gives it.

    Args:
        heads: ``(key, label, pattern [T, T])`` per head offered, most important first; ``key``
            is ``"layer.head"``.
        tokens: the prompt's tokens.
        buttons: how many of the first heads get a one-click button.
    """
    entries = []
    for key, label, pattern in heads:
        grid = array(pattern)
        rows = [
            [round(float(w), _PATTERN_DIGITS) for w in grid[i, : i + 1]] for i in range(len(grid))
        ]
        entries.append({"key": key, "label": label, "pattern": rows})
    payload = {"tokens": list(tokens), "heads": entries, "initial": 0}
    picks = "".join(
        f'<button type="button" data-head="{k}">{esc(label)}</button>'
        for k, (_, label, _) in enumerate(heads[:buttons])
    )
    return (
        f'<div class="oc-attn" data-oculi="attention">{json_script(payload)}'
        f'<div class="oc-heads">{picks} <label>all heads <select></select></label></div>'
        '<div class="oc-caption"></div><div class="oc-tokens"></div>'
        '<div class="oc-matrix"></div></div>'
    )


def capture_attention_view(
    capture: Any, tokens: Sequence[str] | None = None, *, max_values: int = 1_000_000
) -> str:
    """:func:`attention_view` over the heads of an ``AttentionCapture`` of one sequence, in
    layer order, as many as fit in ``max_values`` pattern entries (about 6 bytes each).

    Without ``tokens`` the token ids (from the capture's metadata) label the positions.
    """
    patterns = capture.patterns
    n_layers, n_heads, n = patterns.shape[0], patterns.shape[1], patterns.shape[-1]
    if tokens is None:
        ids = (capture.metadata.get("input_ids") or [[]])[0]
        tokens = [f"#{i}" for i in ids] if len(ids) == n else [str(i) for i in range(n)]
    keep = max(1, max_values // max(1, n * (n + 1) // 2))
    heads = [
        (f"{layer}.{h}", f"L{layer} H{h}", patterns[i, h])
        for i, layer in enumerate(capture.layers)
        for h in range(n_heads)
    ][:keep]
    note = ""
    if len(heads) < n_layers * n_heads:
        note = (
            f'<p class="oc-note">{len(heads)} of {n_layers * n_heads} heads shown (size limit); '
            "pass the ones you want to oculi.visualize.views.attention_view.</p>"
        )
    return note + attention_view(heads, tokens)


def top_tokens_view(items: Sequence[tuple[str, float]]) -> str:
    """The model's next-token distribution, best first, as bars."""
    return bar_list(items)


def _scalar(value: Any) -> float:
    return float(array(value).reshape(-1)[0])


def attribution_view(attribution: Any, layers: Sequence[int] | None = None) -> str:
    """Direct logit attribution: what the embedding, each layer's attention and MLP, and each
    head add to the target's logit (blue raises it, red lowers it). Head cells can be clicked
    to show the head's pattern in the attention view of the same page.

    Args:
        attribution: a DLA result of one sequence and position (``.attention``, ``.mlp``
            ``[L]``; ``.heads`` ``[L, H]`` when captured; ``.embedding``, ``.bias``,
            ``.logit``).
        layers: the model layers of the rows (default ``attribution.layers`` or ``0..L-1``).
    """
    attn, mlp = array(attribution.attention), array(attribution.mlp)
    layers = list(layers or getattr(attribution, "layers", ()) or range(len(attn)))
    rows = [f"L{layer}" for layer in layers]
    parts = [
        grid_table(
            np.stack([attn, mlp], 1), rows, ["attention", "MLP"], diverging=True, corner="layer"
        )
    ]
    if attribution.heads is not None:
        heads = array(attribution.heads)
        parts.append(
            grid_table(
                heads,
                rows,
                [f"H{h}" for h in range(heads.shape[1])],
                diverging=True,
                cell_attrs=lambda r, c: f'data-head="{layers[r]}.{c}"',
                corner="layer \\ head",
            )  # fmt: skip
        )
    terms = [("embedding", attribution.embedding), ("constant (biases)", attribution.bias)]
    terms += [("layers (attention + MLP)", attn.sum() + mlp.sum()), ("logit", attribution.logit)]
    summary = "".join(
        f'<tr><td>{esc(name)}</td><td class="oc-sum" data-v="{_scalar(v)!r}">{_scalar(v):+.3f}</td></tr>'
        for name, v in terms
        if v is not None
    )
    note = (
        f'<p class="oc-note">{esc(attribution.note)}</p>'
        if getattr(attribution, "note", "")
        else ""
    )
    cells = "".join(f"<div>{part}</div>" for part in parts)
    return (
        f'{note}<div class="oc-row oc-dla"><div><table class="oc-list">{summary}</table></div>'
        f"{cells}</div>"
    )


def circuit_view(scores: Any, circuit: Any, top: int = 15) -> str:
    """A discovered circuit: its size and faithfulness, the graph (an inline SVG when
    matplotlib is installed) and the ``top`` edges by ``|score|``, circuit edges marked."""
    kept = set(circuit.names)
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{value:+.4f}</td><td>{'✓' if name in kept else ''}</td></tr>"
        for name, value in scores.top(top)
    )
    summary = (
        f"<p>{circuit.n_edges} edges between {circuit.n_nodes} components "
        f"({esc(scores.method)}, {len(scores.graph.edges)} edges in the graph) keep "
        f"<b>{circuit.faithfulness:.0%}</b> of the clean–corrupt difference "
        f"(metric {circuit.value:.3f}; clean {scores.clean_value:.3f}, corrupt "
        f"{scores.corrupt_value:.3f}; exact edge patching).</p>"
    )
    table = (
        '<table class="oc-grid"><tr><th>edge</th><th>score</th><th>in circuit</th></tr>'
        f"{rows}</table>"
    )
    return summary + _circuit_svg(circuit) + table


def _circuit_svg(circuit: Any) -> str:
    try:
        import io

        from matplotlib.figure import Figure
    except ImportError:  # the page still has the numbers and the table
        return ""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    circuit.plot(ax=fig.subplots())
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return f'<div class="oc-figure">{svg[svg.index("<svg") :]}</div>'
