"""TransformerLens hook names on an oculi model: which exist, and where each one is read.

::

    hook_names(adapter)                       # every TL name this model has, forward order
    resolve(adapter, "blocks.3.attn.hook_z")  # HookSpec(source="site", kind="z", layer=3, ...)
    get_act_name("pattern", 3)                # 'blocks.3.attn.hook_pattern' (TL's shorthand)

Most names are oculi sites (:mod:`oculi.capture.sites` keeps the alias table), read and written
where the site map says, so every family difference (fused QKV, q/k norms, post-norms, parallel
attention) is handled once, there. TransformerLens lays per-head tensors out
``[batch, pos, head, d]`` where oculi stores ``[batch, head, pos, d]``; ``heads`` marks the names
that are transposed on the way in and out (``hook_pattern`` and ``hook_attn_scores`` are
``[batch, head, query_pos, key_pos]`` in both). The others:

- ``hook_embed`` is the token embedding as layer 0 receives it (scaled for Gemma); with a
  learned position embedding (GPT-2) it is the token embedding module's output and
  ``hook_pos_embed`` the position embedding's, so ``hook_embed + hook_pos_embed`` is
  ``blocks.0.hook_resid_pre``.
- ``ln1``/``ln2``/``ln_final.hook_scale`` ``[batch, pos, 1]`` are the norms' divisors
  ``sqrt(mean((x - mean x)^2) + eps)`` (LayerNorm) or ``sqrt(mean(x^2) + eps)`` (RMSNorm),
  computed from the norm's input; they cannot be written.
- ``attn.hook_attn_scores`` are the scores as the softmax gets them: scaled, soft-capped where
  the family caps them, masked entries (causal, padding, sliding window) ``-inf``.
- ``attn.hook_result`` ``[batch, pos, head, d_model]`` is each head's write into the residual,
  exact for families with a norm after attention (Gemma 2/3, OLMo 2) -- see
  :mod:`oculi.tl.cache`; it cannot be written (patch ``attn.hook_z``).
- Names a family lacks are absent: ``hook_rot_q``/``hook_rot_k`` without rotary (GPT-2),
  ``mlp.hook_pre_linear`` with a plain MLP, ``ln1`` without a pre-attention norm (OLMo 2).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from oculi.capture.sites import parse_name
from oculi.errors import LayerIndexError, UnknownSiteError, did_you_mean

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter

Source = Literal["site", "module_out", "scale", "scores"]

# per-block hooks in the order a forward visits them
BLOCK_HOOKS = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
# left out of run_with_cache's default, as TransformerLens leaves them out (use_attn_result,
# use_hook_mlp_in): cache.stack_head_results computes hook_result from hook_z when asked
NOT_BY_DEFAULT = frozenset({"attn.hook_result", "hook_mlp_in"})
_HEADS_FIRST = frozenset({"q_pre", "k_pre", "q", "k", "v", "z", "head_out"})
_BLOCK_PATTERN = re.compile(r"^blocks\.(-?\d+)\.(.+)$")


@dataclass(frozen=True)
class HookSpec:
    """Where one TransformerLens hook name is read (and written) in an oculi model.

    Attributes:
        name: the TL name.
        layer: its block, ``None`` for ``hook_embed``, ``hook_pos_embed`` and ``ln_final.*``.
        source: ``"site"`` (an oculi site ``kind``), ``"module_out"`` (the output of the module
            at ``path``), ``"scale"`` (the divisor of the norm at ``path``, from its input) or
            ``"scores"`` (the masked attention scores).
        kind: the oculi site kind for ``"site"``.
        path: module path, inside the layer when ``layer`` is set, else of the whole model.
        heads: TL stores it ``[B, T, H, ·]`` where oculi has ``[B, H, T, ·]``.
        readonly: why it cannot be written ("" if it can).
    """

    name: str
    layer: int | None
    source: Source
    kind: str | None = None
    path: str | None = None
    heads: bool = False
    readonly: str = ""


def _scale_readonly(name: str) -> str:
    return f"{name!r} is computed from the norm's input and cannot be written; write the input"


_RESULT_READONLY = (
    "{name!r} (each head's write into the residual) is derived from attn.hook_z and cannot be "
    "written; write 'blocks.{layer}.attn.hook_z' (the head's output before the output "
    "projection) or 'blocks.{layer}.hook_attn_out'"
)


def _block_spec(adapter: Adapter, layer: int, hook: str) -> HookSpec | None:
    """The spec of ``blocks.{layer}.{hook}``, or ``None`` where this model has no such hook."""
    anat = adapter.anatomy
    name = f"blocks.{layer}.{hook}"
    norm = {"ln1": anat.attn_norm, "ln2": anat.mlp_norm}.get(hook.split(".")[0], "")
    if norm is None:  # ln1 of OLMo 2: there is no pre-attention norm
        return None
    if hook.endswith("hook_scale"):
        return HookSpec(name, layer, "scale", path=norm, readonly=_scale_readonly(name))
    if hook == "attn.hook_attn_scores":
        return HookSpec(name, layer, "scores")
    if hook in ("attn.hook_rot_q", "attn.hook_rot_k") and not anat.rotary:
        return None
    if hook == "mlp.hook_pre_linear" and not anat.gated:
        return None
    kind, _ = parse_name(name, gated=anat.gated, parallel=anat.is_parallel(adapter.model.config))
    readonly = _RESULT_READONLY.format(name=name, layer=layer) if kind == "head_out" else ""
    return HookSpec(name, layer, "site", kind=kind, heads=kind in _HEADS_FIRST, readonly=readonly)


def _global_specs(adapter: Adapter) -> tuple[list[HookSpec], list[HookSpec]]:
    """``(before the blocks, after them)``."""
    anat = adapter.anatomy
    if anat.pos_embed is not None:
        first = [
            HookSpec("hook_embed", None, "module_out", path=anat.embed),
            HookSpec("hook_pos_embed", None, "module_out", path=anat.pos_embed),
        ]
    else:  # the token embedding as layer 0 receives it (Gemma scales it)
        first = [HookSpec("hook_embed", 0, "site", kind="resid_pre")]
    last = [
        HookSpec(
            "ln_final.hook_scale",
            None,
            "scale",
            path=anat.final_norm,
            readonly=_scale_readonly("ln_final.hook_scale"),
        ),
        HookSpec("ln_final.hook_normalized", None, "module_out", path=anat.final_norm),
    ]
    return first, last


def hook_specs(adapter: Adapter) -> dict[str, HookSpec]:
    """Every TransformerLens hook name of ``adapter``'s model, in forward order."""
    first, last = _global_specs(adapter)
    specs = list(first)
    for layer in range(adapter.n_layers):
        for hook in BLOCK_HOOKS:
            spec = _block_spec(adapter, layer, hook)
            if spec is not None:
                specs.append(spec)
    specs += last
    return {s.name: s for s in specs}


def hook_names(adapter: Adapter) -> list[str]:
    """The TransformerLens hook names ``adapter``'s model has, in forward order.

    ::

        hook_names(adapter)[:3]    # ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale"]
    """
    return list(hook_specs(adapter))


def resolve(adapter: Adapter, name: str, specs: dict[str, HookSpec] | None = None) -> HookSpec:
    """The spec of one TL hook name.

    Raises:
        UnknownSiteError: (a ``KeyError``) an unknown name, with the closest valid ones.
        LayerIndexError: (an ``IndexError``) ``blocks.<layer>.`` past the model's layers.
    """
    specs = specs if specs is not None else hook_specs(adapter)
    if not isinstance(name, str):
        raise TypeError(f"a hook name is a string like 'blocks.0.hook_resid_pre', got {name!r}")
    spec = specs.get(name)
    if spec is not None:
        return spec
    match = _BLOCK_PATTERN.match(name)
    if match is not None and not 0 <= int(match.group(1)) < adapter.n_layers:
        n = adapter.n_layers
        raise LayerIndexError(
            f"hook {name!r}: layer {match.group(1)} out of range for a model with {n} layers "
            f"(0..{n - 1})"
        )
    if match is not None:
        hooks = [n.split(".", 2)[2] for n in specs if n.startswith(f"blocks.{match.group(1)}.")]
        hint = did_you_mean(match.group(2), hooks, prefix=f"blocks.{match.group(1)}.")
        raise UnknownSiteError(
            f"unknown hook {name!r}{hint}; this {adapter.anatomy.family} model's blocks have "
            f"{', '.join(hooks)}"
        )
    globals_ = [n for n in specs if not n.startswith("blocks.")]
    raise UnknownSiteError(
        f"unknown hook {name!r}{did_you_mean(name, globals_)}; names look like "
        f"'blocks.<layer>.<hook>' (e.g. 'blocks.0.attn.hook_pattern') or one of "
        f"{', '.join(globals_)}"
    )


NamesFilter = str | Sequence[str] | Callable[[str], bool] | None


def select(adapter: Adapter, names_filter: NamesFilter) -> list[HookSpec]:
    """The hooks ``names_filter`` picks, as TransformerLens reads it: ``None`` (every hook
    TL caches by default), one name, a list of names, or a predicate on names."""
    specs = hook_specs(adapter)
    if names_filter is None:
        return [s for n, s in specs.items() if n.split(".", 2)[-1] not in NOT_BY_DEFAULT]
    if isinstance(names_filter, str):
        return [resolve(adapter, names_filter, specs)]
    if callable(names_filter):
        return [s for n, s in specs.items() if names_filter(n)]
    if isinstance(names_filter, Sequence):
        return [resolve(adapter, n, specs) for n in dict.fromkeys(names_filter)]
    raise TypeError(
        "names_filter must be None, a hook name, a list of hook names or a function "
        f"name -> bool, got {type(names_filter).__name__}"
    )


_ACT_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
_LAYER_TYPE_ALIASES = {
    "a": "attn",
    "m": "mlp",
    "b": "",
    "block": "",
    "blocks": "",
    "attention": "attn",
}
_ATTN = frozenset({"q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"})
_MLP = frozenset({"pre", "post", "mid", "pre_linear"})


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's shorthand for a hook name.

    Example::

        get_act_name("pattern", 3)           # 'blocks.3.attn.hook_pattern'
        get_act_name("resid_pre", 0)         # 'blocks.0.hook_resid_pre'
        get_act_name("normalized", 2, "ln2") # 'blocks.2.ln2.hook_normalized'
        get_act_name("scale")                # 'ln_final.hook_scale'
        get_act_name("z5")                   # 'blocks.5.attn.hook_z'
    """
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name  # already a full name
    match = re.match(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if match is not None:
        name, digits, layer_type = match.group(1), match.group(2), match.group(3) or None
        layer = int(digits)
    name = _ACT_ALIASES.get(name, name)
    if name in _ATTN:
        layer_type = "attn"
    elif name in _MLP:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    full = f"blocks.{layer}." if layer is not None else ""
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full
