"""From capture configs to site requests, and from recorded tensors back to structures.

One :class:`CapturePlan` serves every ``capture_*`` call: the configs say which sites and
layers to record; after the single forward pass, :meth:`CapturePlan.assemble` slices the
recorded buffers into the structures of :mod:`oculi.capture.structures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from oculi.capture.configs import CaptureConfig, LogitConfig, MLPConfig, ResidualConfig
from oculi.capture.inputs import Batch
from oculi.capture.interrupts import no_grad
from oculi.capture.lens import LogitCapture
from oculi.capture.places import ModelParts
from oculi.capture.structures import (
    AttentionCapture,
    FullCapture,
    MLPCapture,
    ResidualCapture,
    bind_adapter,
)

Recorded = dict[str, tuple[tuple[int, ...], torch.Tensor]]

_ATTN_FIELDS = {
    "queries": ("capture_queries", "q"),
    "keys": ("capture_keys", "k"),
    "values": ("capture_values", "v"),
    "patterns": ("capture_patterns", "pattern"),
    "head_outputs": ("capture_head_outputs", "z"),
    "head_contributions": ("capture_head_contributions", "head_out"),
}
_RESID_FIELDS = {
    "pre_attn": ("capture_pre_attn", "resid_pre"),
    "post_attn": ("capture_post_attn", "resid_mid"),
    "pre_mlp": ("capture_pre_mlp", "mlp_in"),
    "post_mlp": ("capture_post_mlp", "resid_post"),
    "attn_out": ("capture_attn_out", "attn_out"),
    "mlp_out": ("capture_mlp_out", "mlp_out"),
}
_MLP_FIELDS = {
    "gate": ("capture_gate", "mlp_gate"),
    "up": ("capture_up", "mlp_up"),
    "post_activation": ("capture_post_activation", "mlp_post"),
    "output": ("capture_output", "mlp_result"),  # the MLP's own output, before any output norm
}


@dataclass
class CapturePlan:
    """Site requests for one forward pass, and how to build structures from the result."""

    attention: CaptureConfig | None
    residual: ResidualConfig | None
    mlp: MLPConfig | None
    logits: LogitConfig | None
    layers: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # kind -> (layers, dtype, device)
    requests: dict[str, tuple[tuple[int, ...], Any, Any]] = field(default_factory=dict)

    def want(self, kind: str, layers: tuple[int, ...], dtype: Any, device: Any) -> None:
        old = self.requests.get(kind)
        if old is None:
            self.requests[kind] = (layers, dtype, device)
        else:
            merged = old[0] + tuple(layer for layer in layers if layer not in old[0])
            self.requests[kind] = (merged, old[1] or dtype, old[2] or device)

    def assemble(self, adapter: ModelParts, batch: Batch, recorded: Recorded) -> FullCapture:
        meta = _metadata(adapter, batch)
        full = FullCapture(metadata=dict(meta))
        if self.attention is not None:
            cfg = self.attention
            fields = _fields(
                recorded, self.layers["attention"], _ATTN_FIELDS, cfg, batch, self._qk(cfg)
            )
            full.attention = AttentionCapture(
                layers=self.layers["attention"],
                n_heads=adapter.n_heads,
                n_kv_heads=adapter.n_kv_heads,
                head_dim=adapter.d_head,
                qk_stage=cfg.qk_stage,
                metadata=dict(meta),
                **fields,
            )
        if self.residual is not None:
            fields = _fields(recorded, self.layers["residual"], _RESID_FIELDS, self.residual, batch)
            final = _final_norm(adapter, batch, recorded, self.residual)
            residual_meta = dict(meta)
            if final:  # what the seed's (residual, unembed, target) attribution cannot be given
                w_u, unembed_bias, cap = adapter.unembedding()
                residual_meta.update(final_softcap=cap, unembed_bias=unembed_bias is not None)
                d_model = int(w_u.shape[-1])
                residual_meta["final_norm_centers"] = _final_norm_centers(adapter, d_model)
            full.residual = ResidualCapture(
                layers=self.layers["residual"], metadata=residual_meta, **fields, **final
            )
        if self.mlp is not None:
            fields = _fields(recorded, self.layers["mlp"], _MLP_FIELDS, self.mlp, batch)
            full.mlp = MLPCapture(layers=self.layers["mlp"], metadata=dict(meta), **fields)
        if self.logits is not None:
            full.logits = _logit_capture(
                adapter, batch, recorded, self.layers["logits"], self.logits, meta
            )
        for part in (full, full.attention, full.residual, full.mlp, full.logits):
            if part is not None:
                bind_adapter(part, adapter)
        return full

    @staticmethod
    def _qk(cfg: CaptureConfig) -> dict[str, str]:
        if cfg.qk_stage == "pre_rope":
            return {"queries": "q_pre", "keys": "k_pre"}
        return {}


def build_full_capture(
    adapter: ModelParts,
    attention: CaptureConfig | None,
    residual: ResidualConfig | None,
    mlp: MLPConfig | None,
    logits: LogitConfig | None,
) -> CapturePlan:
    """The plan for a capture with these parts (``None`` skips a part)."""
    plan = CapturePlan(attention, residual, mlp, logits)
    for part, cfg, table in (
        ("attention", attention, _ATTN_FIELDS),
        ("residual", residual, _RESID_FIELDS),
        ("mlp", mlp, _MLP_FIELDS),
    ):
        if cfg is None:
            continue
        layers = adapter.resolve_layers(cfg.layers)
        plan.layers[part] = layers
        # cfg is attention here; naming it keeps its CaptureConfig type for mypy
        overrides = (
            CapturePlan._qk(attention) if part == "attention" and attention is not None else {}
        )
        for name, (flag, kind) in table.items():
            if getattr(cfg, flag):
                plan.want(overrides.get(name, kind), layers, cfg.storage_dtype, cfg.storage_device)
    final = adapter.n_layers - 1
    if logits is not None:
        layers = adapter.resolve_layers(logits.layers)
        plan.layers["logits"] = layers
        wanted = layers if final in layers else (*layers, final)
        plan.want("resid_post", wanted, None, None)
    if logits is not None or (residual is not None and final in plan.layers["residual"]):
        # the final norm's input in the model's dtype, whatever the storage dtype
        plan.want("resid_final", (final,), None, None)
    return plan


def _take(
    recorded: Recorded, kind: str, layers: tuple[int, ...], batch: Batch
) -> torch.Tensor | None:
    if kind not in recorded:
        return None
    have, tensor = recorded[kind]
    if have != layers:
        tensor = tensor[:, [have.index(layer) for layer in layers]]
    return tensor[0] if batch.single else tensor


def _fields(recorded, layers, table, cfg, batch, overrides=None) -> dict[str, torch.Tensor | None]:
    overrides = overrides or {}
    return {
        name: _take(recorded, overrides.get(name, kind), layers, batch)
        if getattr(cfg, flag)
        else None
        for name, (flag, kind) in table.items()
    }


def _metadata(adapter: ModelParts, batch: Batch) -> dict[str, Any]:
    return {
        "model": getattr(adapter.model.config, "_name_or_path", "") or type(adapter.model).__name__,
        "family": adapter.anatomy.family,
        "n_layers_model": adapter.n_layers,
        "gated": adapter.anatomy.gated,
        "rotary": adapter.anatomy.rotary,
        # attention and MLP read the same block input (TransformerLens's hook_mlp_in)
        "parallel": adapter.anatomy.is_parallel(adapter.model.config),
        # MLPCapture.output is then not what joins the residual (ResidualCapture.mlp_out is)
        "mlp_out_norm": adapter.anatomy.mlp_out_norm is not None,
        "single": batch.single,
        "input_ids": batch.input_ids.tolist(),
        "attention_mask": batch.attention_mask.tolist(),
    }


def _normalize_final(adapter: ModelParts, recorded: Recorded) -> torch.Tensor:
    """The final norm's output ``[B, T, d]`` after the last layer, from its full-precision input."""
    from oculi.models.weights import execution_device  # oculi.models imports this module

    norm = adapter.module(adapter.anatomy.final_norm)
    with no_grad():  # on the device the norm runs on (a device_map may put it anywhere)
        return norm(recorded["resid_final"][1][:, 0].to(execution_device(norm), adapter.dtype))


def _final_norm_centers(adapter: ModelParts, d_model: int) -> bool:
    """Whether the model's final norm subtracts the mean (a LayerNorm), read off the module."""
    from oculi.models.weights import norm_centers  # oculi.models imports this module

    return norm_centers(adapter.module(adapter.anatomy.final_norm), d_model)


def _final_norm(adapter, batch, recorded, cfg: ResidualConfig) -> dict[str, torch.Tensor | None]:
    """What a residual capture records of the final norm (where it holds the last layer), so
    direct logit attribution can freeze that norm from the capture alone."""
    if "resid_final" not in recorded:
        return {}
    from oculi.models.weights import read_bias  # oculi.models imports this module

    final = _normalize_final(adapter, recorded)
    bias = read_bias(adapter.module(adapter.anatomy.final_norm))
    bias = bias.clone() if bias is not None else None
    store: Any = dict(device=cfg.storage_device, dtype=cfg.storage_dtype)
    if cfg.storage_dtype is not None or cfg.storage_device is not None:
        final = final.to(**store)
        bias = None if bias is None else bias.to(**store)
    return {"final_normalized": final[0] if batch.single else final, "final_norm_bias": bias}


def _logit_capture(adapter, batch, recorded, layers, cfg: LogitConfig, meta) -> LogitCapture:
    from oculi.models.weights import execution_device  # oculi.models imports this module

    norm = adapter.module(adapter.anatomy.final_norm)
    have, resid = recorded["resid_post"]
    where = execution_device(norm)
    normed: torch.Tensor | None = None
    with no_grad():  # a layer at a time: a long context's temporaries stay one layer's
        for i, layer in enumerate(layers):
            one = norm(resid[:, have.index(layer)].to(where, adapter.dtype))
            if normed is None:
                normed = one.new_empty((one.shape[0], len(layers), *one.shape[1:]))
            normed[:, i] = one
    assert normed is not None  # a lens has at least one layer
    final = _normalize_final(adapter, recorded)
    if cfg.storage_dtype is not None or cfg.storage_device is not None:
        normed = normed.to(device=cfg.storage_device, dtype=cfg.storage_dtype)
        final = final.to(device=cfg.storage_device, dtype=cfg.storage_dtype)
    w_u, bias, cap = adapter.unembedding()
    return LogitCapture(
        layers=layers,
        normalized=normed[0] if batch.single else normed,
        unembed=w_u,
        unembed_bias=bias,
        softcap=cap,
        top_k=cfg.top_k,
        chunk_size=cfg.chunk_size,
        strategy=cfg.strategy,
        final_normalized=final[0] if batch.single else final,
        final_norm_bias=adapter.final_norm_bias(),
        metadata=dict(meta),
    )
