"""Sites: the named places in a decoder layer whose activations oculi can read or change.

A site is ``(kind, layer)``. The kinds, in the order the computation visits them::

    resid_pre ─┬─ attn_in ─ q_pre/k_pre ─ q/k/v ─ pattern ─ z ─ head_out ─ attn_out ─┐
               └─────────────────────────────────────────────────────── (+) resid_mid
    resid_mid ── mlp_in ─ mlp_gate/mlp_up ─ mlp_post ─ mlp_out ──────── (+) resid_post

Per-head kinds (``q``, ``k``, ``v``, ``q_pre``, ``k_pre``, ``pattern``, ``z``, ``head_out``) are
stored heads-first, ``[B, H, T, ·]``; ``k``/``v``/``k_pre`` have ``H_kv`` heads. The others are
``[B, T, ·]``. TransformerLens hook names are accepted as aliases (``blocks.3.hook_resid_pre``,
``blocks.3.attn.hook_pattern``, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from oculi.capture.places import LOCATORS, Location, ModelParts
from oculi.errors import UnknownSiteError, did_you_mean


@dataclass(frozen=True)
class SiteKind:
    """One kind of site.

    Attributes:
        name: the oculi name.
        per_head: stored ``[B, H, T, ·]`` rather than ``[B, T, ·]``.
        kv: its heads are key/value heads (``H_kv`` of them).
        width: what the last dimension is: ``"d_model"``, ``"d_head"``, ``"d_mlp"`` or ``"pos"``.
        doc: one line on what it is.

    Where a kind lives in a given model (module, input or output, view) is its locator,
    :meth:`locate` (see :mod:`oculi.capture.places`).
    """

    name: str
    per_head: bool
    kv: bool
    width: str
    doc: str

    def locate(self, m: ModelParts) -> Location:
        """Where this kind is read and written in ``m`` (an adapter)."""
        return LOCATORS[self.name](m)


SITE_KINDS: dict[str, SiteKind] = {
    k.name: k
    for k in [
        SiteKind("resid_pre", False, False, "d_model", "residual entering the block"),
        SiteKind("attn_in", False, False, "d_model", "normalised input of attention"),
        SiteKind("q_pre", True, False, "d_head", "queries before rotary (after any q norm)"),
        SiteKind("k_pre", True, True, "d_head", "keys before rotary (after any k norm)"),
        SiteKind("q", True, False, "d_head", "queries as attention uses them (post-RoPE)"),
        SiteKind("k", True, True, "d_head", "keys as attention uses them (post-RoPE)"),
        SiteKind("v", True, True, "d_head", "values"),
        SiteKind("pattern", True, False, "pos", "attention probabilities"),
        SiteKind("z", True, False, "d_head", "per-head attention output, before o_proj"),
        SiteKind("head_out", True, False, "d_model", "each head's contribution to the residual"),
        SiteKind("attn_out", False, False, "d_model", "what attention adds to the residual"),
        SiteKind("resid_mid", False, False, "d_model", "residual after attention is added"),
        SiteKind("mlp_in", False, False, "d_model", "normalised input of the MLP"),
        SiteKind("mlp_gate", False, False, "d_mlp", "MLP gate projection (gated MLPs)"),
        SiteKind("mlp_up", False, False, "d_mlp", "MLP up/input projection"),
        SiteKind("mlp_post", False, False, "d_mlp", "MLP neuron activations (input of down)"),
        SiteKind("mlp_out", False, False, "d_model", "what the MLP adds to the residual"),
        SiteKind("resid_post", False, False, "d_model", "residual leaving the block"),
    ]
}
"""Every site kind by name, in forward order, with its layout.

::

    SITE_KINDS["k"].per_head, SITE_KINDS["k"].kv, SITE_KINDS["k"].width
    # (True, True, "d_head"): keys are [B, H_kv, T, d_head]
"""

#: Internal kinds a Hugging Face module path can name where no public site is that tensor
#: (:mod:`oculi.intervention.module_paths`): the attention output projection's and the MLP's
#: own outputs in families that normalise a branch before it joins the residual (Gemma 2/3,
#: OLMo 2). Writable, not captured.
MODULE_KINDS: dict[str, SiteKind] = {
    k.name: k
    for k in [
        SiteKind("o_out", False, False, "d_model", "attention's output, before its output norm"),
        SiteKind("mlp_result", False, False, "d_model", "the MLP's output, before its output norm"),
    ]
}

#: kinds stored heads-first, ``[B, H, T, ·]``
PER_HEAD = tuple(k for k, kind in SITE_KINDS.items() if kind.per_head)
#: kinds with a tensor of their own to write (in models that have them; see ``locate``):
#: all but ``head_out``, which is derived from ``z``
WRITABLE = tuple(k for k in SITE_KINDS if k != "head_out")

# TransformerLens name (after "blocks.{l}.") -> oculi kind. TL's hook_q/hook_k are pre-rotary
# and hook_rot_q/hook_rot_k post-rotary; oculi keeps that meaning. TL's hook_mlp_in is the MLP
# block's input *before* its layer norm: resid_mid for sequential blocks, resid_pre for
# parallel ones (see parse_name); the normalised input is ln2.hook_normalized (mlp_in).
TL_ALIASES: dict[str, str] = {
    "hook_resid_pre": "resid_pre",
    "ln1.hook_normalized": "attn_in",
    "attn.hook_q": "q_pre",
    "attn.hook_k": "k_pre",
    "attn.hook_rot_q": "q",
    "attn.hook_rot_k": "k",
    "attn.hook_v": "v",
    "attn.hook_pattern": "pattern",
    "attn.hook_z": "z",
    "attn.hook_result": "head_out",
    "hook_attn_out": "attn_out",
    "hook_resid_mid": "resid_mid",
    "ln2.hook_normalized": "mlp_in",
    "hook_mlp_in": "resid_mid",  # resid_pre for parallel-attention blocks (see parse_name)
    "mlp.hook_pre": "mlp_gate",  # the pre-activation; mlp_up for plain MLPs (see resolve)
    "mlp.hook_pre_linear": "mlp_up",
    "mlp.hook_post": "mlp_post",
    "hook_mlp_out": "mlp_out",
    "hook_resid_post": "resid_post",
}
"""TransformerLens hook name (without ``blocks.{l}.``) -> the oculi site kind it names.

::

    TL_ALIASES["attn.hook_pattern"]      # "pattern": blocks.3.attn.hook_pattern is (pattern, 3)
"""

_TL_PATTERN = re.compile(r"^blocks\.(-?\d+)\.(.+)$")
# a near miss of the block prefix ("block.3.", "layers.3.", "3."), for suggestions
_LAYER_PATTERN = re.compile(r"^(?:[A-Za-z_]+\.)?(-?\d+)\.(.+)$")


def check_kind(kind: str) -> SiteKind:
    """The :class:`SiteKind` named ``kind``; an unknown name suggests close matches."""
    try:
        return SITE_KINDS[kind]
    except KeyError:
        match = _TL_PATTERN.match(kind) if isinstance(kind, str) else None
        if match is not None and match.group(2) in TL_ALIASES:
            raise UnknownSiteError(
                f"unknown site {kind!r}: that is a TransformerLens hook name; here a site is an "
                f"oculi kind with a separate layer, e.g. site="
                f"{TL_ALIASES[match.group(2)]!r}, layer={match.group(1)} "
                f"(valid sites: {', '.join(SITE_KINDS)})"
            ) from None
        raise UnknownSiteError(
            f"unknown site {kind!r}{did_you_mean(kind, SITE_KINDS)} "
            f"(valid sites: {', '.join(SITE_KINDS)})"
        ) from None


def parse_name(name: str, *, gated: bool = True, parallel: bool | None = False) -> tuple[str, int]:
    """``"blocks.3.attn.hook_pattern"`` -> ``("pattern", 3)``.

    ``gated`` says whether the model's MLP is gated: TransformerLens's ``mlp.hook_pre`` is the
    pre-activation, which is the gate projection of a gated MLP and the input projection of a
    plain one. ``parallel`` says whether attention and MLP read the same block input (GPT-NeoX
    with ``use_parallel_residual``): ``hook_mlp_in``, the MLP's input before its norm, is then
    ``resid_pre`` rather than ``resid_mid``; ``None`` (not known) refuses ``hook_mlp_in``.

    Unknown names suggest close ones, comparing the hook part (after ``blocks.<layer>.``).
    """
    match = _TL_PATTERN.match(name)
    if match is None:
        near = _LAYER_PATTERN.match(name)
        if near is not None:  # "block.3.hook_resid_pre": suggest it with the right prefix
            hint = did_you_mean(near.group(2), TL_ALIASES, prefix=f"blocks.{near.group(1)}.")
        else:  # "hook_resid_pre": no layer at all
            hint = did_you_mean(name, TL_ALIASES, prefix="blocks.<layer>.")
        raise UnknownSiteError(
            f"unknown site {name!r}{hint}; names look like 'blocks.<layer>.<hook>', e.g. "
            "'blocks.3.hook_resid_pre' or 'blocks.3.attn.hook_pattern'"
        )
    layer, hook = int(match.group(1)), match.group(2)
    kind = TL_ALIASES.get(hook)
    if kind is None:
        hint = did_you_mean(hook, TL_ALIASES, prefix=f"blocks.{match.group(1)}.")
        raise UnknownSiteError(
            f"unknown site {name!r}{hint} (hooks per block: {', '.join(TL_ALIASES)})"
        )
    if kind == "mlp_gate" and not gated:
        kind = "mlp_up"
    if hook == "hook_mlp_in":
        if parallel is None:
            raise UnknownSiteError(
                f"{name!r} is the MLP's input before its norm, which is resid_mid for "
                "sequential blocks and resid_pre for parallel-attention ones, and this capture "
                "does not record which its model has (metadata 'parallel'); read "
                f"'blocks.{match.group(1)}.hook_resid_mid' or "
                f"'blocks.{match.group(1)}.hook_resid_pre' instead"
            )
        if parallel:
            kind = "resid_pre"
    return kind, layer
