"""What to capture: frozen, validated configs for each capture call.

Each config says which layers and which quantities to record, and how to store them. Layers
not listed are neither hooked nor stored. ``storage_dtype``/``storage_device`` let big
captures live in fp16 on the CPU while the model runs in fp32 on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Layers = Sequence[int] | None


def _check_layers(layers: Layers) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if isinstance(layers, int):
        raise ValueError(
            f"layers must be a list of ints or None, got the int {layers}; use [{layers}]"
        )
    out = tuple(layers)
    for layer in out:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layers must be ints, got {layer!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers {list(out)} lists a layer twice")
    return out


def _check_storage(dtype: torch.dtype | None, device: str | torch.device | None) -> None:
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"storage_dtype must be a torch.dtype, got {dtype!r}")
    if device is not None:
        from oculi.utils import resolve_device

        resolve_device(device)  # a malformed device, or one this torch cannot use


@dataclass(frozen=True)
class _Config:
    """What every config has: the layers (first, may be positional) and where to store.

    ``storage_dtype``/``storage_device`` are keyword-only, so each config's own flags keep
    their positions after ``layers``.
    """

    layers: Layers = None
    storage_dtype: torch.dtype | None = field(default=None, kw_only=True)
    storage_device: str | torch.device | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers(self.layers))
        _check_storage(self.storage_dtype, self.storage_device)


@dataclass(frozen=True)
class CaptureConfig(_Config):
    """Attention internals to capture.

    Example::

        config = CaptureConfig(layers=[20, 21], capture_values=False, qk_stage="pre_rope")

    Attributes:
        layers: layer indices (negative counts from the end), or ``None`` for all.
        capture_queries, capture_keys, capture_values: q ``[L, H, T, D]``, k/v ``[L, H_kv, T, D]``.
        capture_patterns: attention probabilities ``[L, H, T, T]`` (rows sum to 1).
        capture_head_outputs: per-head ``z`` (the input of the output projection)
            ``[L, H, T, D]``.
        capture_head_contributions: each head's contribution to the residual
            ``[L, H, T, d_model]`` (they sum, with the output bias, to the attention output).
        qk_stage: ``"post_rope"`` (what the attention scores use) or ``"pre_rope"`` (the
            projection output, after any q/k norm).
        storage_dtype, storage_device: where captured tensors are kept (default: as computed).
    """

    capture_queries: bool = True
    capture_keys: bool = True
    capture_values: bool = True
    capture_patterns: bool = True
    capture_head_outputs: bool = False
    capture_head_contributions: bool = False
    qk_stage: Literal["pre_rope", "post_rope"] = "post_rope"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qk_stage not in ("pre_rope", "post_rope"):
            raise ValueError(f"qk_stage must be 'pre_rope' or 'post_rope', got {self.qk_stage!r}")


@dataclass(frozen=True)
class ResidualConfig(_Config):
    """Residual-stream points to capture, each ``[L, T, d_model]``.

    Attributes:
        layers: layer indices, or ``None`` for all.
        capture_pre_attn: the residual entering the block.
        capture_post_attn: the residual after the attention output is added.
        capture_pre_mlp: the MLP's actual (normalised) input.
        capture_post_mlp: the residual leaving the block.
        capture_attn_out, capture_mlp_out: what each branch adds to the residual.
    """

    capture_pre_attn: bool = True
    capture_post_attn: bool = True
    capture_pre_mlp: bool = True
    capture_post_mlp: bool = True
    capture_attn_out: bool = False
    capture_mlp_out: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()


@dataclass(frozen=True)
class MLPConfig(_Config):
    """MLP internals to capture.

    Attributes:
        layers: layer indices, or ``None`` for all.
        capture_gate: gate projection ``[L, T, d_mlp]`` (gated MLPs only; ``None`` otherwise).
        capture_up: up (input) projection ``[L, T, d_mlp]``.
        capture_post_activation: the input of the output projection ``[L, T, d_mlp]``
            (``act(gate) * up`` for gated MLPs, ``act(up)`` for plain ones).
        capture_output: the MLP's output ``[L, T, d_model]`` (before any norm that follows
            the MLP; ``ResidualConfig(capture_mlp_out=True)`` gives what joins the residual).
    """

    capture_gate: bool = True
    capture_up: bool = True
    capture_post_activation: bool = True
    capture_output: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()


@dataclass(frozen=True)
class LogitConfig(_Config):
    """Layer-wise logits (logit lens), computed lazily from the normalised residual.

    Attributes:
        layers: layer indices, or ``None`` for all.
        top_k: how many top tokens ``top_k_indices``/``top_k_values``/``top_k_probs`` keep.
        chunk_size: how many logits (floats) one block computes at once, the lens's memory
            cap; ``None`` means 16M (64 MB) on the CPU and half the free memory on CUDA
            (:func:`oculi.capture.lens.default_chunk`). The top-k pass blocks the vocabulary
            or the rows (``strategy``), the other passes block rows of ``[rows, V]``.
        strategy: ``"vocab"`` (CPU), ``"rows"`` (GPU) or ``"auto"`` (by the unembedding's
            device); see :func:`oculi.capture.lens.choose_lens_strategy`. Same numbers.
    """

    top_k: int = 10
    chunk_size: int | None = None
    strategy: Literal["auto", "vocab", "rows"] = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if self.strategy not in ("auto", "vocab", "rows"):
            raise ValueError(f"strategy must be 'auto', 'vocab' or 'rows', got {self.strategy!r}")
