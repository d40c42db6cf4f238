"""Anatomy: where each part of a decoder lives, and what a family does differently.

An :class:`Anatomy` is data, not code. It names the Hugging Face module paths of one
architecture family and the few facts that change how oculi reads it (gated or plain MLP,
fused QKV, q/k norms, norms after the attention or MLP branch, parallel attention, logit
soft-capping). Each family's ``anatomy.py`` builds one and registers it; the adapter and the
capture engine read nothing else about the architecture.

To support a new family, build an ``Anatomy`` and call :func:`register_anatomy`::

    from oculi.models import Anatomy, register_anatomy
    register_anatomy(Anatomy(family="mine", model_types=("my_model",), ...))

Every path is a dotted attribute path: model-level paths are relative to the ``*ForCausalLM``
module, layer-level paths to one decoder layer, attention paths to the attention module and
MLP paths to the MLP module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from oculi.errors import UnsupportedArchitectureError

# rope types transformers implements; anything else is a scaling oculi has not checked.
KNOWN_ROPE_TYPES = frozenset(
    {"default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional"}
)


@dataclass(frozen=True)
class Anatomy:
    """Where the parts of one architecture family live, and what the family does differently.

    Attributes:
        family: short family name (``"llama"``, ``"gemma3"``, ...).
        model_types: ``config.model_type`` values this anatomy reads.
        decoder: the base model without the unembedding (``"model"``, ``"transformer"``).
        layers: the ``ModuleList`` of decoder layers.
        embed: the token embedding.
        pos_embed: a learned absolute position embedding added to it before layer 0 (GPT-2's
            ``wpe``), or ``None``.
        final_norm: the norm applied to the last residual before unembedding.
        unembed: the unembedding (``lm_head``).
        attn: the attention module, relative to a layer.
        attn_norm: the norm whose output feeds attention, or ``None`` (OLMo 2 has none).
        attn_out_norm: a norm applied to the attention output before it joins the residual
            (Gemma 2/3, OLMo 2), or ``None``.
        mlp: the MLP module, relative to a layer.
        mlp_norm: the norm whose output feeds the MLP, or ``None``.
        mlp_out_norm: a norm applied to the MLP output before it joins the residual.
        parallel_attn: attention and MLP both read the layer input (GPT-NeoX, GPT-J). A string
            names the config attribute that switches it.
        q_proj, k_proj, v_proj: separate projections, relative to the attention module.
        qkv_proj: one fused projection instead (GPT-2 ``c_attn``, NeoX, Phi-3).
        qkv_layout: ``"split"``: the fused output is ``[q | k | v]``; ``"per_head"``: it is
            ``[head, (q k v), d_head]`` (GPT-NeoX).
        o_proj: the output projection, relative to the attention module.
        q_norm, k_norm: per-head norms on queries and keys (Qwen 3, Gemma 3, OLMo 2).
        qk_norm_layout: the layout the q/k norm outputs: ``"flat"`` ``[B, T, H*D]``,
            ``"bthd"`` ``[B, T, H, D]`` or ``"bhtd"`` ``[B, H, T, D]``.
        rotary: whether the family rotates q and k (False for GPT-2).
        gate_proj, up_proj, down_proj: MLP projections, relative to the MLP. A plain MLP
            (GPT-2, NeoX) has no gate; its ``up_proj`` is the input projection.
        gate_up_proj: a fused ``[gate | up]`` projection instead (Phi-3).
        conv1d: projections are GPT-2 ``Conv1D`` (weight stored ``[in, out]``).
        norm_offset: RMSNorm multiplies by ``norm_offset + weight`` (1.0 for Gemma).
        final_softcap_attr: config attribute holding the final logit soft-cap, if any.
        unsupported: ``(description, predicate(config))`` pairs for config features this
            anatomy does not model; a true predicate refuses the model.
    """

    family: str
    model_types: tuple[str, ...]
    decoder: str = "model"
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    pos_embed: str | None = None
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    attn: str = "self_attn"
    attn_norm: str | None = "input_layernorm"
    attn_out_norm: str | None = None
    mlp: str = "mlp"
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_out_norm: str | None = None
    parallel_attn: bool | str = False
    q_proj: str | None = "q_proj"
    k_proj: str | None = "k_proj"
    v_proj: str | None = "v_proj"
    qkv_proj: str | None = None
    qkv_layout: Literal["split", "per_head"] = "split"
    o_proj: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    qk_norm_layout: Literal["flat", "bthd", "bhtd"] = "bthd"
    rotary: bool = True
    gate_proj: str | None = "gate_proj"
    up_proj: str | None = "up_proj"
    down_proj: str = "down_proj"
    gate_up_proj: str | None = None
    conv1d: bool = False
    norm_offset: float = 0.0
    final_softcap_attr: str | None = None
    unsupported: tuple[tuple[str, Callable[[Any], bool]], ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.qkv_proj is None) == (self.q_proj is None):
            raise ValueError(f"{self.family}: give either q_proj/k_proj/v_proj or qkv_proj")
        if self.gate_up_proj is not None and self.gate_proj is not None:
            raise ValueError(f"{self.family}: give either gate_proj/up_proj or gate_up_proj")

    @property
    def gated(self) -> bool:
        """Whether the MLP is gated (``act(gate) * up``)."""
        return self.gate_proj is not None or self.gate_up_proj is not None

    def is_parallel(self, config: Any) -> bool:
        """Whether attention and MLP read the same layer input for this config."""
        if isinstance(self.parallel_attn, str):
            return bool(getattr(config, self.parallel_attn, False))
        return self.parallel_attn

    def check_config(self, config: Any) -> None:
        """Refuse config features this anatomy does not model."""
        problems = [desc for desc, pred in self.unsupported if pred(config)]
        problems += _generic_config_problems(config)
        if problems:
            raise UnsupportedArchitectureError(
                f"{type(config).__name__} ({config.model_type}) uses features oculi's "
                f"{self.family!r} anatomy does not model: {'; '.join(problems)}. Numbers would be "
                "silently wrong, so oculi refuses. Register an anatomy that models them "
                "(oculi.models.register_anatomy)."
            )


def _rope_types(config: Any) -> set[str | None]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return set()
    if "rope_type" in params or "type" in params:
        return {params.get("rope_type", params.get("type"))}
    # per layer type (Gemma 3): {"full_attention": {...}, "sliding_attention": {...}}
    return {
        sub.get("rope_type", sub.get("type", "default"))
        for sub in params.values()
        if isinstance(sub, dict)
    }


def _generic_config_problems(config: Any) -> list[str]:
    problems = []
    unknown = {t for t in _rope_types(config) if t is not None} - KNOWN_ROPE_TYPES
    if unknown:
        problems.append(
            f"rope type {sorted(unknown)} (known: {', '.join(sorted(KNOWN_ROPE_TYPES))})"
        )
    for attr in ("num_local_experts", "num_experts", "n_routed_experts"):
        if (getattr(config, attr, 0) or 0) > 0:
            problems.append(f"mixture-of-experts MLP ({attr}={getattr(config, attr)})")
    return problems


_REGISTRY: dict[str, Anatomy] = {}


def register_anatomy(anatomy: Anatomy, *, overwrite: bool = False) -> Anatomy:
    """Make ``anatomy`` the one oculi uses for its ``model_types``.

    ::

        register_anatomy(Anatomy(family="mine", model_types=("my_model",), attn="attention"))
        oculi.attach(my_model, tokenizer)      # now read through that anatomy

    Raises ``ValueError`` when a model type already has another anatomy, unless
    ``overwrite=True``.
    """
    for model_type in anatomy.model_types:
        if model_type in _REGISTRY and not overwrite and _REGISTRY[model_type] != anatomy:
            raise ValueError(
                f"model type {model_type!r} already has the {_REGISTRY[model_type].family!r} "
                "anatomy; pass overwrite=True to replace it"
            )
        _REGISTRY[model_type] = anatomy
    return anatomy


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values oculi has an anatomy for.

    ::

        oculi.supported_model_types()   # ["gemma", "gemma2", "gemma3_text", "gpt2", ...]
    """
    _load_families()
    return sorted(_REGISTRY)


def anatomy_for(model: nn.Module) -> Anatomy:
    """The registered anatomy of ``model``, after checking its config.

    Raises:
        UnsupportedArchitectureError: no anatomy for the model type, or a config feature that
            the anatomy does not model.

    ::

        anatomy_for(model).family       # "gemma3" for Gemma 3 270M
    """
    _load_families()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    anatomy = _REGISTRY.get(model_type) if model_type else None
    if anatomy is None:
        raise UnsupportedArchitectureError(
            f"unknown architecture {model_type!r} ({type(model).__name__}); oculi supports "
            f"{', '.join(sorted(_REGISTRY))}. To add a family, describe its modules with "
            "oculi.models.Anatomy and call oculi.models.register_anatomy(anatomy)."
        )
    anatomy.check_config(config)
    return anatomy


def _load_families() -> None:
    # The family packages register themselves on import; importing here (not at oculi import)
    # keeps `import oculi` free of side effects beyond filling this dict.
    from oculi.models import families  # noqa: F401


def get_path(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.c`` for ``path="a.b.c"`` (integers index module lists)."""
    module: Any = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module
