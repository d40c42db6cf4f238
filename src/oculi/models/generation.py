"""Generation through an adapter: left padding, the context check, and the new ids.

::

    ids = generate_ids(adapter, ["The cat", "A dog ran to the"], max_new_tokens=5)  # [2, 5]

A decoder continues each row after its last column. A batch padded on the right would be
continued after the padding of its shorter rows (transformers only warns), so every batch is
re-padded on the left first (:func:`~oculi.capture.inputs.left_pad`): each row then ends with
its own last token, its positions count its real tokens, and the mask hides the padding, so
each row is generated token for token as its prompt alone (greedy), with or without the KV
cache and with interventions open around the call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from oculi.capture.inputs import REPADDED_SHIFT, Inputs, left_pad, left_pad_shift
from oculi.capture.interrupts import no_grad
from oculi.errors import InputError

if TYPE_CHECKING:
    from oculi.models.adapter import Adapter


def pad_id_of(tokenizer: Any) -> int | None:
    """The id generation pads with: the tokenizer's pad token, else its EOS, else ``None``."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return pad_id if pad_id is not None else getattr(tokenizer, "eos_token_id", None)


def generate_ids(
    adapter: Adapter,
    prompt: Inputs,
    max_new_tokens: int = 20,
    *,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The generated token ids ``[n]`` (``[B, n]`` for a batch), greedy unless ``**kwargs``
    (passed to ``model.generate``) say otherwise.

    Rows that stop early (EOS) are filled with the pad id up to the longest row.

    Raises:
        InputError: bad inputs (see :meth:`~oculi.Adapter.prepare`), or a prompt plus
            ``max_new_tokens`` longer than the model's context.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    pad_id = pad_id_of(adapter.tokenizer)
    given = adapter.prepare(prompt, attention_mask)
    batch = left_pad(given, 0 if pad_id is None else pad_id)
    n = batch.input_ids.shape[1]  # the longest prompt: left_pad drops unused columns
    limit = adapter.max_positions
    if limit is not None and n + max_new_tokens > limit:
        raise InputError(
            f"{n} prompt tokens + max_new_tokens={max_new_tokens} > context {limit} (the "
            f"model's max_position_embeddings); lower max_new_tokens to at most "
            f"{max(limit - n, 0)}"
        )
    kwargs.setdefault("do_sample", False)
    # interventions' positions count columns of the batch as given (intervention/state.py)
    token = REPADDED_SHIFT.set(left_pad_shift(given, batch))
    try:
        with no_grad():
            # generate comes from transformers' GenerationMixin, not nn.Module
            out = cast(Any, adapter.model).generate(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                **kwargs,
            )
    finally:
        REPADDED_SHIFT.reset(token)
    new = out[:, n:]
    return new[0] if batch.single else new
