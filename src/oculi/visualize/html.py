"""HTML building blocks shared by the report and the notebook views (no JavaScript needed
to read them; :data:`SCRIPT` adds the hover and picker behaviour).

Every grid cell carries its exact value in ``data-v`` (``repr`` of the float) and a tooltip,
so the numbers on the page are the numbers of the result, not a rounded picture of them.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from importlib import resources
from typing import Any

from oculi.visualize._common import array


def _asset(name: str) -> str:
    return resources.files("oculi.visualize").joinpath(name).read_text(encoding="utf-8")


def style() -> str:
    """The stylesheet of every oculi view."""
    return _asset("oculi.css")


def script() -> str:
    """The JavaScript of the interactive views (vanilla, self-contained)."""
    return _asset("oculi.js")


def esc(text: Any) -> str:
    """Escape text for HTML content and attribute values."""
    return html.escape(str(text), quote=True)


# inside <script>, "<!--" and "<script" change how the HTML parser finds the closing tag and
# "</" closes it: no "<" (nor ">" and "&") is left in embedded JSON, only its \u escape, which
# JSON.parse reads back as the same character
_JSON_IN_HTML = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def json_in_html(payload: Any) -> str:
    """``payload`` as JSON text safe anywhere inside an HTML ``<script>`` element.

    ``<``, ``>`` and ``&`` appear only as ``\\u003c``, ``\\u003e``, ``\\u0026``: a token such as
    ``<!--``, ``<script>`` or ``</script>`` in a vocabulary cannot end the script early or
    start markup; ``JSON.parse`` (and ``json.loads``) return the original strings.
    """
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_JSON_IN_HTML)


def json_script(payload: Any) -> str:
    """``payload`` as an inert JSON ``<script>`` (see :func:`json_in_html`)."""
    return f'<script type="application/json" class="oc-data">{json_in_html(payload)}</script>'


def token(text: str, cls: str = "oc-tok") -> str:
    """A token in a box that keeps its spaces visible."""
    return f'<span class="{cls}">{esc(text)}</span>'


def color(value: float, scale: float, diverging: bool) -> str:
    """Cell colour: blue for positive (or sequential) values, red for negative ones."""
    if not math.isfinite(value) or scale <= 0:
        return "transparent"
    alpha = min(1.0, abs(value) / scale)
    rgb = "37, 99, 235" if value >= 0 or not diverging else "220, 38, 38"
    return f"rgba({rgb}, {alpha:.3f})"


def _ink(value: float, scale: float) -> str:
    return "#fff" if math.isfinite(value) and scale > 0 and abs(value) / scale > 0.6 else "#111827"


def grid_table(
    values: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    diverging: bool = False,
    fmt: str = "{:.2f}",
    text: Sequence[Sequence[str]] | None = None,
    cell_attrs: Any = None,
    scale: float | None = None,
    corner: str = "",
    shade: Any = None,
) -> str:
    """A heatmap as an HTML table: rows down, columns across, colour by value.

    Args:
        values: ``[rows, cols]`` numbers.
        row_labels, col_labels: header texts.
        diverging: colour negative values red and positive blue, around 0 (else blue only).
        fmt: how a cell shows its value (when ``text`` does not replace it).
        text: per-cell text shown instead of the value (e.g. the top token).
        cell_attrs: ``f(r, c) -> str`` of extra attributes for a cell.
        scale: the value of full colour (default: the largest ``|value|``).
        corner: the top-left header.
        shade: ``[rows, cols]`` numbers that set the colour instead of ``values`` (the cells
            still show and carry ``values``).
    """
    grid = array(values)
    if grid.ndim == 1:
        grid = grid[:, None]
    tint = grid if shade is None else array(shade).reshape(grid.shape)
    finite = tint[~(tint != tint)]
    top = float(abs(finite).max()) if finite.size else 0.0
    scale = top if scale is None else scale
    out = ['<table class="oc-grid"><tr>', f"<th>{esc(corner)}</th>"]
    out += [f"<th>{esc(c)}</th>" for c in col_labels]
    out.append("</tr>")
    for r, label in enumerate(row_labels):
        out.append(f"<tr><th>{esc(label)}</th>")
        for c in range(grid.shape[1]):
            v, k = float(grid[r, c]), float(tint[r, c])
            shown = text[r][c] if text is not None else fmt.format(v)
            tip = f"{row_labels[r]}, {col_labels[c]}: {fmt.format(v)}"
            extra = f" {cell_attrs(r, c)}" if cell_attrs else ""
            cls = ' class="oc-text"' if text is not None else ""
            out.append(
                f'<td{cls} data-v="{v!r}" title="{esc(tip)}" style="background:'
                f'{color(k, scale, diverging)};color:{_ink(k, scale)}"{extra}>{esc(shown)}</td>'
            )
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def bar_list(items: Sequence[tuple[str, float]], *, width: int = 160) -> str:
    """Tokens with probability bars (a top-k table)."""
    rows = []
    for text, p in items:
        bar = f'<span class="oc-bar" style="width:{max(1, round(width * p))}px"></span>'
        rows.append(
            f'<tr><td>{token(text)}</td><td>{bar}</td><td data-v="{float(p)!r}">{p:.1%}</td></tr>'
        )
    return f'<table class="oc-list">{"".join(rows)}</table>'


def line_chart(
    series: dict[str, Sequence[float]],
    x_labels: Sequence[Any],
    *,
    y_max: float = 1.0,
    width: int = 560,
    height: int = 180,
    y_label: str = "",
) -> str:
    """A small SVG line chart of a few series over the same x axis (e.g. layers)."""
    left, bottom, top, right = 44, 24, 10, 110
    n = max(len(x_labels), 2)
    w, h = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> str:
        y = min(max(v / y_max if y_max else 0.0, 0.0), 1.0)
        return f"{left + w * i / (n - 1):.1f},{top + h * (1 - y):.1f}"

    palette = ["#2563eb", "#dc2626", "#059669", "#d97706"]
    parts = [f'<svg width="{width}" height="{height}" role="img">']
    parts.append(
        f'<line x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" stroke="#9ca3af"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="#9ca3af"/>'
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{y_max:g}</text>'
        f'<text x="{left - 6}" y="{top + h}" text-anchor="end">0</text>'
        f'<text x="4" y="{top + h / 2}">{esc(y_label)}</text>'
    )
    step = max(1, len(x_labels) // 12)
    for i in range(0, len(x_labels), step):
        x = xy(i, 0).split(",")[0]
        parts.append(
            f'<text x="{x}" y="{height - 6}" text-anchor="middle">{esc(x_labels[i])}</text>'
        )
    for k, (name, values) in enumerate(series.items()):
        colour = palette[k % len(palette)]
        points = " ".join(xy(i, float(v)) for i, v in enumerate(values))
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>'
        )
        parts.append(
            f'<text x="{left + w + 8}" y="{top + 14 + 16 * k}" style="fill:{colour}">{esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def fragment(body: str, *, interactive: bool = False) -> str:
    """A notebook output: the body in an ``.oculi`` box with the styles (and the script)."""
    js = f"<script>{script()}</script>" if interactive else ""
    return f'<div class="oculi"><style>{style()}</style>{body}{js}</div>'
