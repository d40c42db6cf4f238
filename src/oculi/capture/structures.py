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
                    final_normalized     ``[T, d_model]``
                    final_norm_bias      ``[d_model]`` (no batch dim)
MLPCapture          gate, up             ``[L, T, d_mlp]``
                    post_activation      ``[L, T, d_mlp]``
                    output               ``[L, T, d_model]``
==================  ===================  =====================================

``L`` counts the captured layers (``.layers`` lists them), ``H`` query heads, ``H_kv`` key/value
heads, ``T`` tokens, ``D`` the head dimension.

A capture made by an adapter also keeps a *weak* reference to that adapter
(:func:`bound_adapter`): it never keeps the model alive, is never saved, pickled or copied, and
only lets analyses that read weights (head composition) find them when the caller passes the
capture alone. Everything a capture's numbers mean is in its tensors and metadata.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from oculi.capture.sites import SITE_KINDS, TL_ALIASES, parse_name
from oculi.errors import LayerIndexError, UnknownSiteError


class LayerIndexed:
    """Lookup of model layers in a capture that holds some of them (``self.layers``)."""

    layers: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        """How many layers this capture holds (``len(self.layers)``)."""
        return len(self.layers)

    def layer_index(self, layer: int) -> int:
        """Position of model layer ``layer`` in this capture's layer dimension."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise LayerIndexError(
                f"layer {layer} was not captured; this capture holds layers {list(self.layers)}"
            ) from None


def bind_adapter(capture: Any, adapter: Any) -> None:
    """Let ``capture`` find the adapter that made it while that adapter lives (a weak reference)."""
    capture.__dict__["_adapter_ref"] = weakref.ref(adapter)


def bound_adapter(capture: Any) -> Any:
    """The live adapter that made ``capture``, or ``None`` (loaded from a file, copied, or the
    adapter is gone)."""
    ref = getattr(capture, "__dict__", {}).get("_adapter_ref")
    return ref() if ref is not None else None


class Storable:
    """``save`` and ``to_numpy`` for every capture structure (the formats: :mod:`oculi.capture.io`)."""

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the weak reference to the adapter (plain data only)."""
        state = dict(self.__dict__)
        state.pop("_adapter_ref", None)
        return state

    def save(
        self, path: str | os.PathLike, *, format: str | None = None, overwrite: bool = True
    ) -> None:
        """Write this capture to ``path`` (:func:`oculi.capture.io.save_capture`).

        Example::

            full.save("~/runs/eiffel.safetensors", overwrite=False)
            full.save("eiffel.npz")               # an .npz: np.load reads it

        ``format`` is ``"safetensors"``, ``"npz"``, ``"hdf5"``, ``"json"`` (metadata only) or
        ``"pickle"``; by default it comes from the suffix (``.safetensors``, ``.npz``,
        ``.h5``/``.hdf5``, ``.json``; none: safetensors), and a suffix that contradicts
        ``format`` is refused. A pickle is written only with ``format="pickle"``. An existing
        file is replaced unless ``overwrite=False``; the folder must exist. A ``LogitCapture``
        is saved with its top-k (computed first if needed), without the unembedding, which
        belongs to the model.
        """
        # oculi.capture.io imports these classes to rebuild them from files: imported on use
        from oculi.capture.io.save import save_capture

        save_capture(self, path, format=format, overwrite=overwrite)

    def to_numpy(self) -> dict[str, Any]:
        """The tensors a saved file holds, as NumPy arrays by the same names (``"queries"``;
        ``"attention.queries"`` for a ``FullCapture``), on the CPU, bf16/fp8 as float32."""
        from oculi.capture.io.save import capture_to_numpy

        return capture_to_numpy(self)


@dataclass
class _Capture(LayerIndexed, Storable):
    """Shared behaviour: layer lookup, metadata, I/O."""

    layers: tuple[int, ...]
    metadata: dict[str, Any] = field(default_factory=dict, kw_only=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

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

    def _repr_html_(self) -> str | None:
        """Jupyter's view of captured patterns: head picker and token hover, as in the report."""
        if self.patterns is None or self.patterns.dim() != 4:
            return None  # nothing to draw for q/k/v-only or batched captures: plain repr
        from oculi.visualize.views import capture_attention_view, notebook

        return notebook(capture_attention_view(self), interactive=True)

    @property
    def n_tokens(self) -> int:
        """Sequence length ``T``: every field has it second to last (0 if nothing is held)."""
        for tensor in self.tensors().values():
            return int(tensor.shape[-2])
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
        final_normalized: the model's final norm applied to the last layer's output, ``[T,
            d_model]``, computed from the full-precision residual of the same forward (kept
            when the capture holds the last layer). With it, direct logit attribution on this
            capture alone freezes the final norm exactly (:mod:`oculi.analysis.dla`).
        final_norm_bias: the final norm's additive bias ``[d_model]`` where it has one (the
            LayerNorm of GPT-2 and GPT-NeoX), else ``None``.
    """

    pre_attn: torch.Tensor | None = None
    post_attn: torch.Tensor | None = None
    pre_mlp: torch.Tensor | None = None
    post_mlp: torch.Tensor | None = None
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    final_normalized: torch.Tensor | None = None
    final_norm_bias: torch.Tensor | None = None


@dataclass
class MLPCapture(_Capture):
    """MLP internals of the captured layers.

    Attributes:
        gate: gate projection ``[L, T, d_mlp]`` (``None`` for plain MLPs).
        up: up/input projection ``[L, T, d_mlp]``.
        post_activation: neuron activations, the input of the output projection.
        output: the MLP's output ``[L, T, d_model]``, the output projection's result. Where a
            norm follows the MLP (Gemma 2/3, OLMo 2) what joins the residual is that norm's
            output, ``ResidualCapture.mlp_out``.
    """

    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None
    post_activation: torch.Tensor | None = None
    output: torch.Tensor | None = None


# SAELens' HookedSAETransformer names an SAE's latents "<hook name>.hook_sae_acts_post"
SAE_ACTS_SUFFIX = ".hook_sae_acts_post"

# oculi site kind -> where a FullCapture keeps it, as (part, field) candidates: the first one
# captured wins (what the MLP adds is ResidualCapture.mlp_out and, unless a norm follows the
# MLP as in Gemma 2/3 and OLMo 2, also MLPCapture.output).
_ALIAS_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "resid_pre": (("residual", "pre_attn"),),
    "resid_mid": (("residual", "post_attn"),),
    "mlp_in": (("residual", "pre_mlp"),),
    "resid_post": (("residual", "post_mlp"),),
    "attn_out": (("residual", "attn_out"),),
    "mlp_out": (("residual", "mlp_out"), ("mlp", "output")),
    "q": (("attention", "queries"),),
    "k": (("attention", "keys"),),
    "v": (("attention", "values"),),
    "q_pre": (("attention", "queries"),),
    "k_pre": (("attention", "keys"),),
    "pattern": (("attention", "patterns"),),
    "z": (("attention", "head_outputs"),),
    "head_out": (("attention", "head_contributions"),),
    "mlp_gate": (("mlp", "gate"),),
    "mlp_up": (("mlp", "up"),),
    "mlp_post": (("mlp", "post_activation"),),
}
# the config that captures each part; a field ``f`` is switched on by ``capture_f=True``
_PART_CONFIGS = {"attention": "CaptureConfig", "residual": "ResidualConfig", "mlp": "MLPConfig"}


@dataclass
class FullCapture(Storable):
    """Attention, residual, MLP and layer-wise logits from one forward pass.

    Index it with TransformerLens names to reuse analysis code::

        full["blocks.3.attn.hook_pattern"]   # [H, T, T] (oculi's layout, no batch dim)
        full["blocks.3.hook_resid_pre"]      # [T, d_model]
        full["blocks.-1.hook_resid_post"]    # negative blocks count from the last layer

    Tensors keep oculi's heads-first layout (``[H, T, D]``, where TransformerLens has
    ``[T, H, D]``) and gain a leading ``B`` for batched captures. ``attn.hook_q``/``hook_k`` are
    the pre-rotary queries/keys and ``attn.hook_rot_q``/``hook_rot_k`` the rotated ones, as in
    TransformerLens; a capture holds one stage (``CaptureConfig.qk_stage``), and models without
    rotary embeddings serve both names from it. ``ln1.hook_normalized`` (attention's normalised
    input) is a site for interventions but no capture structure stores it.
    """

    attention: AttentionCapture | None = None
    residual: ResidualCapture | None = None
    mlp: MLPCapture | None = None
    logits: Any = None  # LogitCapture
    metadata: dict[str, Any] = field(default_factory=dict)
    # capture_full(saes=[...]): each SAE's latents, [B, T, d_sae]; metadata["saes"] says which
    latents: list[torch.Tensor] | None = None

    def _repr_html_(self) -> str | None:
        """Jupyter's view: the attention part's head picker (when patterns were captured)."""
        return self.attention._repr_html_() if self.attention is not None else None

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor a TransformerLens hook name refers to, for one layer.

        Raises:
            UnknownSiteError: (a ``KeyError``) an unknown name, with close matches; or a known
                one this capture did not record, naming the config flag that records it.
            LayerIndexError: a block outside the model, or one not captured.
        """
        if not isinstance(name, str):
            raise TypeError(
                f"FullCapture is indexed by TransformerLens hook names such as "
                f"'blocks.3.hook_resid_pre', got {name!r}"
            )
        if name.endswith(SAE_ACTS_SUFFIX):
            return self._latents_at(name)
        kind, layer = parse_name(
            name, gated=self.metadata.get("gated", True), parallel=self._parallel()
        )
        places = _ALIAS_FIELDS.get(kind)
        if places is None:
            served = [alias for alias, k in TL_ALIASES.items() if k in _ALIAS_FIELDS]
            raise UnknownSiteError(
                f"{name!r} ({kind}, the {SITE_KINDS[kind].doc}) is not stored in capture "
                f"structures; per block a FullCapture holds {', '.join(served)}"
            )
        if kind in ("q", "k", "q_pre", "k_pre"):
            self._check_qk_stage(name, kind)
        layer = self._resolve_layer(name, layer)
        for part_name, field_name in places:
            if (part_name, field_name) == ("mlp", "output") and self.metadata.get("mlp_out_norm"):
                continue  # the MLP's output before its norm is not what joins the residual
            part = getattr(self, part_name)
            tensor = getattr(part, field_name, None) if part is not None else None
            if tensor is None:
                continue
            if layer not in part.layers:
                raise LayerIndexError(
                    f"{name!r}: layer {layer} was not captured; the {part_name} part holds "
                    f"layers {list(part.layers)}"
                )
            return part._select_layer(tensor, layer)
        how = " or ".join(
            f"{_PART_CONFIGS[p]}(capture_{f}=True)"
            for p, f in places
            if not ((p, f) == ("mlp", "output") and self.metadata.get("mlp_out_norm"))
        )
        raise UnknownSiteError(f"{name!r} ({kind}) was not captured; capture it with {how}")

    def _latents_at(self, name: str) -> torch.Tensor:
        """SAELens' name of an SAE's latents: the first SAE of ``saes=`` at that site."""
        hook = name[: -len(SAE_ACTS_SUFFIX)]
        kind, layer = parse_name(
            hook, gated=self.metadata.get("gated", True), parallel=self._parallel()
        )
        layer = self._resolve_layer(hook, layer)
        bound = self.metadata.get("saes") or []
        for i, sae in enumerate(bound):
            if (sae["site"], sae["layer"]) == (kind, layer) and self.latents is not None:
                return self.latents[i]
        held = [f"{s['site']} of layer {s['layer']}" for s in bound]
        raise UnknownSiteError(
            f"{name!r}: no SAE read {kind} of layer {layer} in this capture; "
            + (f"its SAEs read {', '.join(held)}" if held else "capture_full(saes=[...]) adds them")
        )

    def _parallel(self) -> bool | None:
        """Whether the model's blocks are parallel (``None``: not recorded and possible)."""
        parallel = self.metadata.get("parallel")
        if parallel is not None:
            return bool(parallel)
        from oculi.models.anatomy import _REGISTRY, _load_families

        _load_families()
        family = self.metadata.get("family")
        maybe = any(a.parallel_attn for a in _REGISTRY.values() if a.family == family)
        return None if maybe or family is None else False

    def _check_qk_stage(self, name: str, kind: str) -> None:
        if self.attention is None or not self.metadata.get("rotary", True):
            return  # without rotary embeddings the two stages are the same tensor
        stage = "pre_rope" if kind.endswith("_pre") else "post_rope"
        if self.attention.qk_stage != stage:
            held = self.attention.qk_stage.replace("_", "-")
            raise UnknownSiteError(
                f"{name!r} is the {stage.replace('_', '-')} {kind[0]}, but this capture holds "
                f"{held} queries/keys; capture with CaptureConfig(qk_stage={stage!r})"
            )

    def _resolve_layer(self, name: str, layer: int) -> int:
        n = self.metadata.get("n_layers_model")
        if n is None:
            if layer < 0:
                raise LayerIndexError(
                    f"{name!r}: a negative block needs the model's layer count, which this "
                    "capture's metadata lacks ('n_layers_model')"
                )
            return layer
        if not -n <= layer < n:
            raise LayerIndexError(
                f"{name!r}: layer {layer} out of range for a model with {n} layers (0..{n - 1})"
            )
        return layer % n
