"""The input induction is measured on: a random token sequence repeated twice.

::

    ids = repeated_random_tokens(adapter, 50)                 # [1 + 100]: BOS, x, x
    capture = adapter.capture(ids)
    CircuitDetection.detect_induction_heads(capture)          # [L, H]

An induction head at a token of the second copy attends to the token right after that token's
first occurrence (``A B ... A → B``). On ordinary text few tokens repeat, so there is little to
measure; on a random sequence repeated twice every query of the second copy has exactly one
such target, and nothing but induction can predict it (the tokens are random, so no n-gram
statistics or meaning help). The tokens are drawn without replacement from the tokenizer's
real vocabulary, special tokens excluded (so ``n`` distinct tokens, and no token repeats
within a copy), seeded, and the sequence starts with BOS when the tokenizer adds one (models
trained with BOS behave oddly without it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from oculi.errors import InputError


def _special_ids(adapter: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (added ones marked special included), or, with no
    tokenizer, the model config's BOS/EOS/PAD ids."""
    tok = adapter.tokenizer
    if tok is None:
        cfg = adapter.model.config
        found = (getattr(cfg, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id"))
        out: set[int] = set()
        for i in found:
            out.update(i if isinstance(i, (list, tuple)) else [i] if i is not None else [])
        return out
    out = set(getattr(tok, "all_special_ids", []) or [])
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            out.add(int(i))
    return out


def _bos(adapter: Any) -> int | None:
    """The BOS id when the tokenizer puts one in front of its encodings, else ``None``."""
    tok = adapter.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if bos is None:
        return None
    ids = tok("a")["input_ids"]
    return int(bos) if ids and ids[0] == bos else None


def repeated_random_tokens(
    adapter: Any, n: int, *, seed: int = 0, batch: int | None = None
) -> Tensor:
    """``n`` random real tokens, repeated twice, after BOS when the model uses one.

    Example::

        ids = oculi.analysis.repeated_random_tokens(adapter, 50)   # [101] with BOS
        scores = CircuitDetection.detect_induction_heads(adapter.capture(ids))

    Args:
        adapter: the model (its tokenizer gives the vocabulary, special tokens and BOS).
        n: tokens per copy, at least 2 and at most the number of real tokens.
        seed: the random generator's seed (the same seed gives the same tokens).
        batch: ``None`` for one sequence ``[T]``; an int ``B`` for ``[B, T]``, each row its
            own draw.

    Returns:
        int64 ids ``[T]`` (or ``[B, T]``) on the model's device, ``T = 2n`` plus 1 with BOS.

    Raises:
        InputError: ``n`` or ``batch`` not a positive int in range.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InputError(f"n must be an int >= 2 (tokens per copy), got {n!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise InputError(f"batch must be None or a positive int, got {batch!r}")
    special = _special_ids(adapter)
    vocab = torch.tensor(
        [i for i in range(adapter.vocab_limit) if i not in special], dtype=torch.long
    )
    if n > vocab.numel():
        raise InputError(
            f"n={n} tokens per copy, but the vocabulary has {vocab.numel()} real tokens "
            f"(special ones excluded): use n <= {vocab.numel()}"
        )
    gen = torch.Generator().manual_seed(seed)
    rows = []
    bos = _bos(adapter)
    for _ in range(batch or 1):
        x = vocab[torch.randperm(vocab.numel(), generator=gen)[:n]]
        row = torch.cat([x, x])
        if bos is not None:
            row = torch.cat([torch.tensor([bos]), row])
        rows.append(row)
    out = torch.stack(rows).to(adapter.device)
    return out if batch is not None else out[0]
