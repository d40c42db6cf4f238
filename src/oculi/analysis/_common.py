"""What every analysis needs from a capture: the right field, the real positions, checked indices.

Captures of one sequence hold ``[L, H, T, ...]`` tensors; batches hold ``[B, L, H, T, ...]``,
possibly padded. The helpers here let each analysis treat both alike:

* :func:`attention_of` accepts an :class:`~oculi.capture.structures.AttentionCapture` or a
  :class:`~oculi.capture.structures.FullCapture` (whose ``.attention`` it takes);
* :func:`position_mask` says which query positions hold real tokens (from the
  ``attention_mask`` the capture recorded), so per-position results can mark padding ``NaN``
  and means can skip it;
* :func:`sequences` cuts a batch into its rows, each trimmed to its real tokens, for the
  analyses (circuit scores) whose positions must line up with the tokens.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from oculi.capture.structures import AttentionCapture, FullCapture
from oculi.errors import InputError, LayerIndexError

# field -> the CaptureConfig flag that fills it
_FLAGS = {
    "queries": "capture_queries",
    "keys": "capture_keys",
    "values": "capture_values",
    "patterns": "capture_patterns",
}
# tensor rank of each field for one sequence; a batch adds one
_RANK = {"queries": 4, "keys": 4, "values": 4, "patterns": 4}


def attention_of(capture: Any) -> AttentionCapture:
    """The attention capture inside ``capture`` (itself, or ``full.attention``)."""
    if isinstance(capture, FullCapture):
        if capture.attention is None:
            raise InputError(
                "this FullCapture holds no attention capture; capture it with "
                "adapter.capture_full(..., attention=CaptureConfig())"
            )
        return capture.attention
    if not isinstance(capture, AttentionCapture):
        raise InputError(
            f"expected an AttentionCapture (from adapter.capture(...)), got {type(capture).__name__}"
        )
    return capture


def field(capture: AttentionCapture, name: str) -> Tensor:
    """``capture.<name>`` as float32, or an error saying how to capture it."""
    tensor = getattr(capture, name)
    if tensor is None:
        raise InputError(
            f"this capture has no {name}; capture with CaptureConfig({_FLAGS[name]}=True)"
        )
    if tensor.dim() not in (_RANK[name], _RANK[name] + 1):
        raise InputError(
            f"capture.{name} has shape {tuple(tensor.shape)}; expected {_RANK[name]} dims for "
            f"one sequence or {_RANK[name] + 1} for a batch"
        )
    return tensor.float()


def is_batched(tensor: Tensor, name: str) -> bool:
    """Whether ``tensor`` (a capture's field ``name``) has a leading batch dimension."""
    return tensor.dim() == _RANK[name] + 1


def real_mask(metadata: dict[str, Any], batch: int | None, n_pos: int) -> Tensor | None:
    """Bool ``[B, T]`` (``[T]`` when ``batch`` is None) of real tokens, or None if all are real.

    Read from ``metadata["attention_mask"]``; captures built by hand without one count every
    position as real.
    """
    mask = metadata.get("attention_mask")
    if mask is None:
        return None
    m = torch.as_tensor(mask).bool()
    if batch is None:
        if m.dim() == 2:
            if m.shape[0] != 1:
                return None
            m = m[0]
        if m.shape != (n_pos,):
            return None
    elif m.shape != (batch, n_pos):
        return None
    return None if bool(m.all()) else m


def position_mask(
    metadata: dict[str, Any], batch: int | None, n_pos: int, ignore_first: int = 0
) -> Tensor:
    """Bool ``[B, T]`` (or ``[T]``) of real positions, dropping each row's first ``ignore_first``.

    Raises:
        ValueError: ``ignore_first`` is negative, or leaves no position in some row.
    """
    if isinstance(ignore_first, bool) or not isinstance(ignore_first, int) or ignore_first < 0:
        raise ValueError(f"ignore_first must be a non-negative int, got {ignore_first!r}")
    real = real_mask(metadata, batch, n_pos)
    shape = (n_pos,) if batch is None else (batch, n_pos)
    if real is None:
        real = torch.ones(shape, dtype=torch.bool)
    # the k-th real token of a row is where the running count of real tokens reaches k
    keep = real & (real.long().cumsum(-1) > ignore_first)
    if not bool(keep.any(-1).all()):
        raise ValueError(
            f"ignore_first={ignore_first} leaves no position to use: the shortest sequence has "
            f"{int(real.sum(-1).min())} tokens"
        )
    return keep


def mark_padding(values: Tensor, metadata: dict[str, Any], batched: bool) -> Tensor:
    """Set the padded positions (last dimension) of per-position ``values`` to NaN."""
    batch = values.shape[0] if batched else None
    real = real_mask(metadata, batch, values.shape[-1])
    if real is None:
        return values
    if batched:  # [B, T] -> [B, 1, ..., 1, T]
        real = real.reshape(real.shape[0], *([1] * (values.dim() - 2)), real.shape[-1])
    return values.masked_fill(~real.to(values.device), float("nan"))


def token_ids(
    capture: AttentionCapture, input_ids: Any, batch: int | None, n_pos: int
) -> list[list[int]] | None:
    """Token ids as one list per row (padding included), or None when unknown.

    Explicit ``input_ids`` win over ``capture.metadata["input_ids"]``.
    """
    source = "input_ids"
    ids = input_ids
    if ids is None:
        ids = capture.metadata.get("input_ids")
        source = 'capture.metadata["input_ids"]'
        if ids is None:
            return None
    rows = torch.as_tensor(ids).long()
    if rows.dim() == 1:
        rows = rows[None]
    want = (1 if batch is None else batch, n_pos)
    if rows.dim() != 2 or tuple(rows.shape) != want:
        raise InputError(
            f"{source} has shape {tuple(rows.shape)}, but the capture holds "
            f"{want[0]} sequence(s) of {n_pos} tokens"
        )
    return rows.tolist()


def sequences(
    patterns: Tensor, metadata: dict[str, Any], batched: bool, ids: list[list[int]] | None
) -> list[tuple[Tensor, list[int] | None]]:
    """Each row's ``[L, H, t, t]`` pattern and its ``t`` token ids, cut to the real tokens."""
    n_pos = patterns.shape[-1]
    rows = patterns if batched else patterns[None]
    real = real_mask(metadata, rows.shape[0] if batched else None, n_pos)
    if real is not None and not batched:
        real = real[None]
    out = []
    for b in range(rows.shape[0]):
        p = rows[b]
        row_ids = ids[b] if ids is not None else None
        if real is not None:
            keep = real[b].nonzero().flatten()
            p = p[..., keep[:, None], keep[None, :]]
            if row_ids is not None:
                row_ids = [row_ids[i] for i in keep.tolist()]
        out.append((p, row_ids))
    return out


def check_index(value: Any, size: int, what: str) -> int:
    """``value`` as an index into ``size`` items (negatives count from the end)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if not -size <= value < size:
        error = LayerIndexError if what == "layer" else IndexError
        raise error(f"{what} {value} out of range: valid {what}s are 0..{size - 1}")
    return value % size


def capture_layer(layers: Sequence[int], layer: Any, n_layers_model: int | None) -> int:
    """Position in ``layers`` of model layer ``layer`` (negatives count from the model's end)."""
    if isinstance(layer, Tensor) and layer.numel() == 1:
        layer = int(layer)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {layer!r}")
    model_layer = layer + n_layers_model if layer < 0 and n_layers_model else layer
    if model_layer not in layers:
        raise LayerIndexError(
            f"layer {layer} was not captured; this capture holds model layers {list(layers)}"
        )
    return list(layers).index(model_layer)


def check_fraction(value: float, what: str) -> float:
    """A threshold in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def real_positions(
    metadata: dict[str, Any], batch: int | None, n_pos: int, positions: Sequence[int]
) -> Tensor:
    """Tensor indices ``[B, P]`` of ``positions`` counted among each row's real tokens.

    ``-1`` is each row's last real token, also in left- or right-padded batches; a capture of
    one sequence gives ``B = 1``.

    Raises:
        IndexError: a position outside some row's real tokens.
    """
    real = real_mask(metadata, batch, n_pos)
    rows = 1 if batch is None else batch
    if real is None:
        real = torch.ones((rows, n_pos), dtype=torch.bool)
    elif batch is None:
        real = real[None]
    out = []
    for row in real:
        index = row.nonzero().flatten().tolist()
        out.append([index[check_index(p, len(index), "position")] for p in positions])
    return torch.tensor(out, dtype=torch.long)


def as_positions(position: Any) -> tuple[bool, list[int]]:
    """``(one position given, the positions as a list)``: an int (NumPy's and 0-d tensors
    too) or a sequence of them."""
    if isinstance(position, bool):
        raise TypeError(f"position must be an int or a list of ints, got {position!r}")
    if isinstance(position, numbers.Integral) or (
        isinstance(position, Tensor) and position.dim() == 0
    ):
        return True, [int(position)]
    try:
        return False, [operator.index(p) for p in position]
    except TypeError:
        raise TypeError(f"position must be an int or a list of ints, got {position!r}") from None
