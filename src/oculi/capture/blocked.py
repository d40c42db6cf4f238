"""Attention a block of query positions at a time: long contexts without ``[H, T, T]`` scores.

An eager attention layer materialises its scores and probabilities ``[B, H, T, S]`` at once:
at 16,384 tokens and 4 heads that is 4 GiB per tensor in float32. Every query row of
attention is independent of the others (its scores, its softmax over the keys, its weighted
sum of the values), so the same function run on rows ``r0:r1`` of the queries and of the mask
gives rows ``r0:r1`` of the result. :func:`blocked_attention` does exactly that with the
layer's own implementation (the family's ``eager_attention_forward``, soft-capping, scaling and
sinks included, or sdpa), handing each block of the pattern ``[B, H, r1 - r0, S]`` to the row
taps (a streaming capture writes it to its buffer or to disk) before the next is computed::

    z, _ = blocked_attention(module, family_eager(module), q, k, v, bool_mask, rows=512,
                             row_taps=[lambda r0, block: ...])
    z.shape      # [B, T, H, D], what the unblocked call returns

While a bridge runs blocked (:class:`~oculi.capture.bridge.attention_bridge` with ``rows``),
transformers builds the boolean ``[B, 1, T, S]`` mask (1 byte an element, sdpa's) instead of
the additive float one; each eager block gets its rows as the additive mask eager attention
would have been given (``0`` where attended, the dtype's minimum elsewhere: transformers'
``eager_mask`` of the same boolean mask), so the numbers are the unblocked ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# Scores plus probabilities of one block stay under this (see :func:`block_rows`).
BLOCK_BYTES = 128 * 2**20

RowTap = Callable[[int, torch.Tensor], None]


def block_rows(
    batch: int, heads: int, keys: int, score_bytes: int, budget: int = BLOCK_BYTES
) -> int:
    """Query rows per block so that one block's scores (``score_bytes`` per element, see
    :func:`oculi.capture.memory.score_bytes`) take at most ``budget`` bytes (at least 1).

    Example:
        >>> block_rows(1, 4, 16384, 8)   # 4 heads x 16,384 keys x 8 bytes = 512 KiB per row
        256
    """
    return max(1, budget // max(1, batch * heads * keys * score_bytes))


def _mask_rows(
    mask: torch.Tensor | None, r0: int, r1: int, t: int, s: int, like: torch.Tensor, additive: bool
) -> torch.Tensor:
    """Rows ``r0:r1`` of the mask, over the first ``s`` keys: boolean (``True``: attended), or
    additive in ``like``'s dtype for eager attention. ``None`` (a model that built no mask) is
    the causal mask with the queries as the last ``t`` of the ``s`` keys."""
    if mask is None:
        rows = torch.ones(r1 - r0, s, dtype=torch.bool, device=like.device).tril(s - t + r0)
        block = rows[None, None]
    else:
        block = mask[:, :, r0:r1, :s]
    if not additive:
        return block
    if block.dtype != torch.bool:  # already additive (a float mask given to a blocked bridge)
        return block
    zero = torch.zeros((), device=block.device, dtype=like.dtype)
    return torch.where(block, zero, torch.finfo(like.dtype).min)


def blocked_attention(
    module: nn.Module,
    fn: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    rows: int,
    row_taps: Sequence[RowTap] = (),
    additive: bool = True,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``fn`` (an ``AttentionInterface`` function) over blocks of ``rows`` query positions.

    Args:
        module: the attention module (``fn`` reads its scaling, soft-cap, ...).
        fn: the implementation: the family's eager forward (``additive=True``) or sdpa's
            (``additive=False``; its mask stays boolean).
        query: ``[B, H, T, D]``; key/value ``[B, H_kv, S, D]``.
        attention_mask: ``[B, 1, T, >=S]`` boolean or additive, or ``None`` (causal).
        rows: query positions per block.
        row_taps: called as ``tap(r0, pattern_block [B, H, r, S])`` in order of ``r0`` (eager
            only: sdpa computes no pattern).

    Returns:
        ``(z [B, T, H, D], None)``: the attention output, as ``fn`` returns it for all rows.
    """
    b, _, t, _ = query.shape
    s = key.shape[-2]
    out: torch.Tensor | None = None
    for r0 in range(0, t, rows):
        r1 = min(t, r0 + rows)
        mask = _mask_rows(attention_mask, r0, r1, t, s, query, additive)
        z, weights = fn(module, query[:, :, r0:r1], key, value, mask, **kwargs)
        if out is None:
            out = z.new_empty((b, t, *z.shape[2:]))
        out[:, r0:r1] = z
        for tap in row_taps:
            tap(r0, weights)
        del z, weights, mask
    assert out is not None  # t >= 1
    return out, None


def original_attention(module: nn.Module, name: str) -> Callable[..., Any]:
    if name == "eager":
        return family_eager(module)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name]


def family_eager(module: nn.Module) -> Callable[..., Any]:
    """The ``eager_attention_forward`` of the module's own modeling file."""
    from oculi.capture.bridge import eager_attention  # the bridge imports this module

    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return fn if fn is not None else eager_attention


def additive_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A blocked bridge's boolean mask as the additive one eager attention takes."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), device=mask.device, dtype=like.dtype)
    return torch.where(mask, zero, torch.finfo(like.dtype).min)


def run_attention(
    module: nn.Module,
    name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    rows: int | None,
    row_taps: list[RowTap] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The implementation ``name``, by blocks of ``rows`` query positions when a blocked
    bridge is open, eager (the family's) wherever ``row_taps`` read the pattern."""
    eager = name == "eager" or bool(row_taps)
    if not rows and not row_taps:
        return original_attention(module, name)(module, query, key, value, mask, **kwargs)
    fn = family_eager(module) if eager else original_attention(module, name)
    return blocked_attention(
        module,
        fn,
        query,
        key,
        value,
        mask,
        rows=rows or query.shape[2],
        row_taps=row_taps or (),
        additive=eager,
        **kwargs,
    )
