"""Capture structures: plain tensors plus the metadata needed to read them.

No structure holds a reference to the model. A single sequence gives the shapes below; a
batch of ``B > 1`` sequences gives the same shapes with a leading ``B``.

==================  ===================  =====================================
structure           field                shape
==================  ===================  =====================================
AttentionCapture    queries              ``[L, H, T, D]``
                    keys, values         ``[L, H_kv, T, D]``
                    patterns             ``[L, H, T, T]``
                    head_outputs (z)     ``[L, H, T, D]``
                    head_contributions   ``[L, H, T, d_model]``
ResidualCapture     pre_attn, post_attn  ``[L, T, d_model]``
                    pre_mlp, post_mlp    ``[L, T, d_model]``
MLPCapture          gate, up             ``[L, T, d_mlp]``
                    post_activation      ``[L, T, d_mlp]``
                    output               ``[L, T, d_model]``
==================  ===================  =====================================

``L`` counts the captured layers (``.layers`` lists them), ``H`` query heads, ``H_kv`` key/value
heads, ``T`` tokens, ``D`` the head dimension.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from oculi.capture.sites import parse_name
from oculi.errors import LayerIndexError, UnknownSiteError


@dataclass
class _Capture:
    """Shared behaviour: layer lookup, metadata, I/O."""

    layers: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict, kw_only=True)

    @property
    def n_layers(self) -> int:
        """How many layers this capture holds (``len(self.layers)``)."""
        return len(self.layers)

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` in this capture's leading dimension."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise LayerIndexError(
                f"layer {layer} was not captured; this capture holds layers {list(self.layers)}"
            ) from None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def save(self, path: str, *, format: str = "safetensors") -> None:
        """Save to ``path`` (safetensors + JSON metadata); see :mod:`oculi.capture.io`."""
        from oculi.capture.io import save_capture

        save_capture(self, path, format=format)

    def _batch_dims(self) -> int:
        return 0 if self.metadata.get("single", True) else 1

    def _select_layer(self, tensor: torch.Tensor, layer: int) -> torch.Tensor:
        i = self.layer_index(layer)
        return tensor[i] if self._batch_dims() == 0 else tensor[:, i]


@dataclass
class AttentionCapture(_Capture):
    """Attention internals of the captured layers.

    Attributes:
        queries: ``[L, H, T, D]``, post- or pre-RoPE per ``qk_stage``.
        keys, values: ``[L, H_kv, T, D]``.
        patterns: ``[L, H, T, T]``; row ``i`` is query position ``i``'s distribution over keys.
        head_outputs: per-head ``z`` ``[L, H, T, D]``.
        head_contributions: per-head residual contributions ``[L, H, T, d_model]``.
        n_heads, n_kv_heads, head_dim: the model's attention sizes.
        qk_stage: ``"post_rope"`` or ``"pre_rope"``.
    """

    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    patterns: torch.Tensor | None = None
    head_outputs: torch.Tensor | None = None
    head_contributions: torch.Tensor | None = None
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    qk_stage: str = "post_rope"

    @property
    def n_tokens(self) -> int:
        for t in self.tensors().values():
            return t.shape[-2] if t is not self.head_contributions else t.shape[-2]
        return 0


@dataclass
class ResidualCapture(_Capture):
    """The residual stream at the four points of each captured layer, ``[L, T, d_model]``.

    Attributes:
        pre_attn: the residual entering the block.
        post_attn: the residual after attention's output is added.
        pre_mlp: the MLP's actual (normalised) input.
        post_mlp: the residual leaving the block.
        attn_out, mlp_out: what attention and the MLP add to the residual.
    """

    pre_attn: torch.Tensor | None = None
    post_attn: torch.Tensor | None = None
    pre_mlp: torch.Tensor | None = None
    post_mlp: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None


@dataclass
class MLPCapture(_Capture):
    """MLP internals of the captured layers.

    Attributes:
        gate: gate projection ``[L, T, d_mlp]`` (``None`` for plain MLPs).
        up: up/input projection ``[L, T, d_mlp]``.
        post_activation: neuron activations, the input of the output projection.
        output: the MLP's output ``[L, T, d_model]``.
    """

    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None
    post_activation: torch.Tensor | None = None
    output: torch.Tensor | None = None


# TransformerLens alias kind -> (part of FullCapture, field)
_ALIAS_FIELDS = {
    "resid_pre": ("residual", "pre_attn"),
    "resid_mid": ("residual", "post_attn"),
    "mlp_in": ("residual", "pre_mlp"),
    "resid_post": ("residual", "post_mlp"),
    "attn_out": ("residual", "attn_out"),
    "mlp_out": ("mlp", "output"),
    "q": ("attention", "queries"),
    "k": ("attention", "keys"),
    "v": ("attention", "values"),
    "q_pre": ("attention", "queries"),
    "k_pre": ("attention", "keys"),
    "pattern": ("attention", "patterns"),
    "z": ("attention", "head_outputs"),
    "head_out": ("attention", "head_contributions"),
    "mlp_gate": ("mlp", "gate"),
    "mlp_up": ("mlp", "up"),
    "mlp_post": ("mlp", "post_activation"),
}


@dataclass
class FullCapture:
    """Attention, residual, MLP and layer-wise logits from one forward pass.

    Index it with TransformerLens names to reuse analysis code::

        full["blocks.3.attn.hook_pattern"]   # [H, T, T] (oculi's layout, no batch dim)
        full["blocks.3.hook_resid_pre"]      # [T, d_model]
    """

    attention: AttentionCapture | None = None
    residual: ResidualCapture | None = None
    mlp: MLPCapture | None = None
    logits: Any = None  # LogitCapture
    metadata: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        gated = self.metadata.get("gated", True)
        kind, layer = parse_name(name, gated=gated)
        part_name, field_name = _ALIAS_FIELDS[kind]
        if kind in ("q", "k", "q_pre", "k_pre") and self.attention is not None:
            stage = "pre_rope" if kind.endswith("_pre") else "post_rope"
            if self.attention.qk_stage != stage:
                raise UnknownSiteError(
                    f"{name!r} is the {stage.replace('_', '-')} {kind[0]}, but this capture "
                    f"holds {self.attention.qk_stage.replace('_', '-')} queries/keys; capture "
                    f"with CaptureConfig(qk_stage={stage!r})"
                )
        part = getattr(self, part_name)
        tensor = getattr(part, field_name, None) if part is not None else None
        if tensor is None:
            raise UnknownSiteError(
                f"{name!r} ({kind}) was not captured; enable it in the {part_name} config"
            )
        n_layers = self.metadata.get("n_layers_model")
        if n_layers is not None and layer < 0:
            layer += n_layers
        return part._select_layer(tensor, layer)

    def save(self, path: str, *, format: str = "safetensors") -> None:
        """Save every part to ``path``; see :mod:`oculi.capture.io`."""
        from oculi.capture.io import save_capture

        save_capture(self, path, format=format)
