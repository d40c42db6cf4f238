"""An offline HTML page of SAE latents: for each, its density, activation histogram, the
tokens it promotes and suppresses, and its top-activating contexts with every token shaded by
the latent's activation (the exact value in ``data-v`` and the tooltip).

::

    feats = oculi.sae.top_activations(store, sae)
    oculi.visualize.write_feature_page(feats, adapter, "features.html", latents=[3, 12, 40])
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oculi.visualize.html import color, esc, script, style


def _histogram(
    counts: Sequence[int], edges: Sequence[float], width: int = 280, height: int = 60
) -> str:
    """Log-binned activation counts as an SVG bar chart (bins without counts trimmed)."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return '<span class="oc-meta">never active</span>'
    lo, hi = nz[0], nz[-1] + 1
    shown = counts[lo:hi]
    peak = max(shown)
    w = width / len(shown)
    bars = "".join(
        f'<rect x="{i * w:.1f}" y="{height - height * c / peak:.1f}" width="{max(w - 1, 1):.1f}" '
        f'height="{height * c / peak:.1f}" fill="#2563eb"><title>{edges[lo + i]:.3g}–'
        f"{edges[lo + i + 1]:.3g}: {c}</title></rect>"
        for i, c in enumerate(shown)
    )
    return (
        f'<svg width="{width}" height="{height + 14}" role="img">{bars}'
        f'<text x="0" y="{height + 12}" font-size="10">{edges[lo]:.3g}</text>'
        f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">'
        f"{edges[hi]:.3g}</text></svg>"
    )


def _context_line(ctx: Any, texts: list[str], scale: float) -> str:
    spans = []
    for j, (text, value) in enumerate(zip(texts, ctx.activations)):
        bg = color(value, scale, False)
        ink = "#fff" if scale > 0 and value / scale > 0.6 else "#111827"
        outline = " outline:2px solid #dc2626;" if j == ctx.center else ""
        spans.append(
            f'<span class="oc-tok" data-v="{float(value)!r}" title="{value:.4g}" '
            f'style="background:{bg};color:{ink};{outline}">{esc(text)}</span>'
        )
    return (
        f'<div class="oc-tokens">{"".join(spans)} <span class="oc-meta">'
        f"{ctx.activation:.4g} (prompt {ctx.prompt_id}, token {ctx.position})</span></div>"
    )


def feature_page(
    features: Any,
    adapter: Any,
    latents: Sequence[int] | None = None,
    *,
    n_contexts: int = 8,
    window: int = 8,
    n_tokens: int = 8,
    title: str | None = None,
) -> str:
    """The page (a string) for ``latents`` of a :class:`~oculi.sae.TopActivations`.

    ``latents`` default: up to 24 latents that fired, chosen evenly over their density ranks.

    ::

        html = feature_page(top_activations(store, sae, k=20), adapter, latents=[3, 17])
    """
    from oculi.sae.features import BINS, logit_effects

    sae = features.sae
    if latents is None:
        alive = [int(i) for i in features.density.argsort(descending=True).tolist()
                 if features.counts[i] > 0]  # fmt: skip
        step = max(1, len(alive) // 24)
        latents = alive[::step][:24]
    tok = adapter.tokenizer
    edges = BINS.tolist()
    writes_residual = sae.write_site in (
        "resid_pre",
        "resid_mid",
        "resid_post",
        "attn_out",
        "mlp_out",
    )
    sections = []
    for latent in latents:
        contexts = features.contexts(latent, window=window, n=n_contexts)
        scale = max((c.activation for c in contexts), default=0.0)
        lines = "".join(
            _context_line(c, [tok.decode([t]) for t in c.token_ids], scale) for c in contexts
        )
        effects = ""
        if writes_residual and contexts:
            up, down = logit_effects(adapter, sae, latent, context=contexts[0], k=n_tokens)
            fmt = ", ".join
            effects = (
                '<p class="oc-caption">promotes: '
                + fmt(f"<code>{esc(tok.decode([t]))}</code> {v:+.3g}" for t, v in up)
                + "<br>suppresses: "
                + fmt(f"<code>{esc(tok.decode([t]))}</code> {v:+.3g}" for t, v in down)
                + "</p>"
            )
        density = float(features.density[latent])
        head = (
            f'<h3 id="latent-{latent}">latent {latent}</h3><p class="oc-meta">density '
            f"{100 * density:.3g}% ({int(features.counts[latent]):,} of {features.n_tokens:,} "
            f"tokens) · max {float(features.values[0, latent]):.4g}"
            + (f" · log10 density {math.log10(density):.2f}" if density > 0 else "")
            + "</p>"
        )
        hist = _histogram(features.hist[latent].tolist(), edges)
        sections.append(
            f'<section class="oc-detail">{head}{hist}{effects}{lines or "<p>never active</p>"}</section>'
        )
    name = title or f"SAE latents: {sae.kind} on {sae.site} of layer {sae.layer}"
    summary = (
        f'<p class="oc-note">{sae.d_sae:,} latents, {features.n_tokens:,} tokens read; '
        f"{int((features.counts == 0).sum()):,} never fired. Each context shades tokens by the "
        "latent's activation (hover for the value); the outlined token is the top example. "
        "Promoted/suppressed: the direct effect of one unit of the latent on each token's "
        "logit through the final norm frozen at the first context.</p>"
    )
    index = " ".join(f'<a href="#latent-{i}">{i}</a>' for i in latents)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(name)}</title><style>{style()}"
        "body{max-width:1100px;margin:24px auto;padding:0 16px}"
        ".oc-detail{margin:12px 0}</style></head>"
        f'<body class="oculi"><h1>{esc(name)}</h1>{summary}<p>{index}</p>{"".join(sections)}'
        f"<script>{script()}</script></body></html>"
    )


def write_feature_page(
    features: Any,
    adapter: Any,
    path: str | os.PathLike,
    latents: Sequence[int] | None = None,
    **options: Any,
) -> Path:
    """Write :func:`feature_page` to ``path`` atomically (the folder must exist).

    ::

        write_feature_page(top_activations(store, sae, k=20), adapter, "features.html")
    """
    from oculi.capture.io.files import user_path, write_atomically

    text = feature_page(features, adapter, latents, **options)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomically(path, write, overwrite=True, what="the feature page")
    return user_path(path)[0]
