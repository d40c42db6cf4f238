"""Tables the concepts pages show, computed from oculi's own site map at build time.

``site_map_table()`` asks :func:`oculi.capture.places.locate` where every site kind is read and
written in each registered family (the same call captures, interventions, patching and
gradients make), so the table is what the code does, not a description of it. Families whose
column would be identical share it. ``families_table()`` lists each registered anatomy with
what it does differently. ``tools/docs/hooks.py`` puts them where a page says
``<!-- oculi:site-map -->`` or ``<!-- oculi:families -->``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


def _anatomies() -> list[Any]:
    from oculi.models.anatomy import _REGISTRY, _load_families

    _load_families()
    unique: dict[str, Any] = {}
    for anatomy in _REGISTRY.values():
        unique.setdefault(anatomy.family, anatomy)
    return sorted(unique.values(), key=lambda a: a.family)


def _parts(anatomy: Any) -> Any:
    """What a locator reads of a model, for ``anatomy`` with its default transformers config."""
    import transformers

    config = transformers.AutoConfig.for_model(anatomy.model_types[0])
    return SimpleNamespace(
        anatomy=anatomy,
        model=SimpleNamespace(config=config),
        n_heads=2,
        n_kv_heads=1,
        d_head=4,
    )


_PARTS = {"q_pre": "q part of ", "k_pre": "k part of ", "mlp_gate": "gate half of ",
          "mlp_up": "up half of "}  # fmt: skip


def _place(place: Any, kind: str) -> str:
    if place.tap is not None:
        return f"attention bridge `{place.tap}`"
    where = f"`{place.module}`" if place.module else "layer"
    text = f"{where} {place.at}"
    view = getattr(place.view, "__qualname__", "")
    if view.startswith(("fused_qkv_view", "half_view")):  # a slice of a fused projection
        text = _PARTS[kind] + text
    if place.plus_input:
        text = f"layer input + {text}"
    return text


def _cell(location: Any, kind: str) -> str:
    if location.absent:
        return "— (absent)"
    if location.read is None and location.write is None:
        return "derived from " + " + ".join(f"`{k}`" for k in location.derived) + ", read-only"
    read = (
        _place(location.read, kind)
        if location.read is not None
        else "derived: " + " + ".join(f"`{k}`" for k in location.derived)
    )
    if location.write is None:
        return f"{read}; read-only"
    if location.write == location.read:
        return read
    return f"read: {read}; written: {_place(location.write, kind)}"


def site_map_table() -> str:
    """Markdown: every site kind with its shape and where it is read and written. A kind placed
    alike in every family is one row of the first table; each other kind gets a table of its
    own, one row per group of families that place it alike."""
    from oculi.capture.places import locate
    from oculi.capture.sites import SITE_KINDS, TL_ALIASES

    anatomies = _anatomies()
    parts = [_parts(a) for a in anatomies]
    tl: dict[str, list[str]] = {}
    for alias, kind_name in TL_ALIASES.items():
        tl.setdefault(kind_name, []).append(f"`{alias}`")
    rows = [
        "| site | what it is | shape | read and written at | TransformerLens alias |",
        "| --- | --- | --- | --- | --- |",
    ]
    varying = []
    for kind in SITE_KINDS.values():
        heads = "H_kv" if kind.kv else "H"
        shape = f"[B, {heads}, T, {kind.width}]" if kind.per_head else f"[B, T, {kind.width}]"
        groups: dict[str, list[str]] = {}
        for anatomy, part in zip(anatomies, parts):
            groups.setdefault(_cell(locate(kind.name, part), kind.name), []).append(anatomy.family)
        if len(groups) == 1:
            where = next(iter(groups)) + " (every family)"
        else:
            where = f"[by family](#site-{kind.name.replace('_', '-')})"
            varying.append((kind, groups))
        aliases = ", ".join(tl.get(kind.name, [])) or "–"
        rows.append(f"| `{kind.name}` | {kind.doc} | `{shape}` | {where} | {aliases} |")
    text = "\n".join(rows)
    for kind, groups in varying:
        text += f"\n\n### `{kind.name}` {{#site-{kind.name.replace('_', '-')}}}\n\n"
        text += f"{kind.doc[0].upper()}{kind.doc[1:]}.\n\n"
        text += "| families | read and written at |\n| --- | --- |\n"
        text += "\n".join(f"| {', '.join(fams)} | {cell} |" for cell, fams in groups.items())
    return text


def families_table() -> str:
    """Markdown: each registered family, its model types and what its anatomy records."""
    rows = [
        "| family | `config.model_type` | attention | MLP | norms | positions |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for a in _anatomies():
        attn = []
        if a.qkv_proj:
            layout = "per head" if a.qkv_layout == "per_head" else r"`[q \| k \| v]`"
            attn.append(f"fused `{a.qkv_proj}` ({layout})")
        else:
            attn.append("separate q/k/v")
        if a.q_norm:
            attn.append("q/k norm")
        if a.parallel_attn:
            attn.append("parallel with the MLP")
        if a.gate_up_proj:
            mlp = f"gated, fused `{a.gate_up_proj}`"
        else:
            mlp = "gated" if a.gated else "plain (no gate)"
        norms = []
        if a.attn_norm is None:
            norms.append("no pre-attention norm")
        if a.attn_out_norm or a.mlp_out_norm:
            norms.append("norm on each branch output")
        if a.norm_offset:
            norms.append(f"RMSNorm × (`{a.norm_offset:g}` + w)")
        if a.final_softcap_attr:
            norms.append("final logit soft-cap")
        positions = "rotary" if a.rotary else "learned"
        if a.pos_embed:
            positions += f" (`{a.pos_embed}`)"
        types = ", ".join(f"`{t}`" for t in a.model_types)
        rows.append(
            f"| {a.family} | {types} | {'; '.join(attn)} | {mlp} | "
            f"{'; '.join(norms) or 'pre-norm'} | {positions} |"
        )
    return "\n".join(rows)
