"""Before/after figure of an intervention: how the next-token distribution moved.

::

    before = adapter.forward(prompt)
    with InterventionContext(adapter, [HeadAblation(layer=3, head=1)]):
        after = adapter.forward(prompt)
    intervention_comparison(before, after, adapter.tokenizer, k=10)

The bars are the probabilities (softmax of the logits at ``position``) of the ``k`` tokens
most likely before or after: the tokens are ranked by the larger of their two probabilities,
so a token the intervention promotes shows up as well as one it suppresses.
"""

from __future__ import annotations

from typing import Any

import torch

from oculi.errors import InputError
from oculi.visualize._common import new_axes


def _next_token_probs(logits: Any, position: int, what: str) -> torch.Tensor:
    """Softmax ``[V]`` of ``logits [V]`` or of row ``position`` of ``logits [T, V]``."""
    values = torch.as_tensor(logits).detach().double().cpu()
    if values.dim() == 2:
        n = values.shape[0]
        if not -n <= position < n:
            raise InputError(f"position {position} out of range for {n} positions (-{n}..{n - 1})")
        values = values[position]
    elif values.dim() != 1:
        raise InputError(
            f"{what} must be [V] or [T, V] logits of one sequence, got shape {list(values.shape)}"
        )
    return torch.softmax(values, -1)


def intervention_comparison(
    before_logits: Any,
    after_logits: Any,
    tokenizer: Any = None,
    *,
    k: int = 10,
    position: int = -1,
    ax: Any = None,
) -> Any:
    """Grouped bars of the top-``k`` next-token probabilities before and after; the ``Axes``.

    Args:
        before_logits, after_logits: ``[T, V]`` (or ``[V]``) logits without and with the
            intervention, as ``adapter.forward`` returns them.
        tokenizer: decodes the token labels (ids without one).
        k: how many tokens to show.
        position: the row of ``[T, V]`` logits to read (the last by default).

    Raises:
        InputError: shapes that differ or are not ``[V]``/``[T, V]``, a position out of range,
            or ``k`` outside ``1..V``.
    """
    shapes = [list(torch.as_tensor(x).shape) for x in (before_logits, after_logits)]
    if shapes[0] != shapes[1]:
        raise InputError(
            f"before_logits {shapes[0]} and after_logits {shapes[1]} must have the same shape"
        )
    before = _next_token_probs(before_logits, position, "before_logits")
    after = _next_token_probs(after_logits, position, "after_logits")
    n_vocab = before.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_vocab:
        raise InputError(f"k={k!r}, but it must be an int in 1..{n_vocab} (the vocabulary)")
    ids = torch.maximum(before, after).topk(k).indices.tolist()
    labels = [repr(tokenizer.decode([i])) if tokenizer is not None else str(i) for i in ids]
    ax = new_axes(ax, max(6.0, 0.6 * k + 2), 4.0)
    x = list(range(k))
    ax.bar([i - 0.2 for i in x], before[ids].numpy(), width=0.4, label="before", color="#9ca3af")
    ax.bar([i + 0.2 for i in x], after[ids].numpy(), width=0.4, label="after", color="#2563eb")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("next-token probability")
    ax.set_title(f"top {k} next tokens before and after the intervention")
    ax.legend()
    return ax
